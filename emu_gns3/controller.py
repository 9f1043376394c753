"""A client of a GNS3 controller's REST API v3, for running a lab there (``emu run
--controller``).

It logs in as a controller user (``POST /v3/access/users/authenticate`` gives a JWT that
every later request carries), and turns every refusal into an error that names the request
and repeats the controller's own message. A wrong user or password is bad input (a
:class:`~emucore.errors.ConfigError`, exit code 2); a controller that cannot be reached or
refuses a request is an :class:`EmuError` (exit code 1).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from emucore.errors import ConfigError, EmuError

# Node starts on a compute wait for the emulator; GNS3's controller itself allows 240 s.
REQUEST_TIMEOUT = 300.0
CONNECT_TIMEOUT = 15.0
# An image upload takes as long as its size needs (no total limit); once the bytes are
# sent, the controller may still hash and store them before it answers.
UPLOAD_READ_TIMEOUT = 300.0


class ControllerError(EmuError):
    """The controller refused a request or could not be reached.

    :ivar status: the HTTP status (0 when there was no answer).
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class ControllerAccess:
    """Where the controller is and whom to log in as.

    :ivar url: the controller's base URL, without ``/v3`` (``http://host:3080``).
    :ivar user: a controller user allowed to create projects.
    :ivar password: that user's password.
    """

    url: str
    user: str
    password: str = attrs.field(repr=False)


def base_url(url: str) -> str:
    """``url`` as ``scheme://host:port`` (a trailing ``/`` or ``/v3`` removed).

    :raises ConfigError: not an http or https URL with a host.
    """
    parsed = urllib.parse.urlsplit(url.strip())
    path = parsed.path.rstrip("/")
    path = path.removesuffix("/v3")
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query:
        raise ConfigError(
            "--controller", [f"must be the controller's http:// or https:// URL, got {url!r}"]
        )
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


class Controller:
    """A logged-in session with a GNS3 controller (use :meth:`connect`, then :meth:`close`)."""

    def __init__(self, access: ControllerAccess, http: aiohttp.ClientSession, token: str) -> None:
        """Use :meth:`connect`."""
        self.url = access.url
        self._api = access.url + "/v3"
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"}
        self.token = token

    @classmethod
    async def connect(cls, access: ControllerAccess) -> Controller:
        """Log in.

        :raises ConfigError: the user or password was refused.
        :raises ControllerError: the controller cannot be reached.
        """
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        http = aiohttp.ClientSession(timeout=timeout)
        login = {"username": access.user, "password": access.password}
        url = access.url + "/v3/access/users/authenticate"
        try:
            async with http.post(url, json=login) as answer:
                body = await _body(answer)
                if answer.status in (401, 403, 422):
                    raise ConfigError(
                        "--controller",
                        [f"{access.url} refused the login of {access.user!r}: {_message(body)}"],
                    )
                if answer.status >= 400:
                    raise ControllerError(
                        f"{access.url}: login failed (HTTP {answer.status}): {_message(body)}",
                        answer.status,
                    )
        except aiohttp.ClientError as exc:
            await http.close()
            raise ControllerError(f"cannot reach the GNS3 controller {access.url}: {exc}") from None
        except TimeoutError:
            await http.close()
            raise ControllerError(
                f"the GNS3 controller {access.url} did not answer the login in time"
            ) from None
        except BaseException:
            await http.close()
            raise
        return cls(access, http, str(body["access_token"]))

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request of the REST API (``path`` after ``/v3``); the decoded JSON answer.

        :raises ControllerError: an error status (with the controller's message) or no answer.
        """
        try:
            async with self._http.request(
                method, self._api + path, json=body, headers=self._headers
            ) as answer:
                decoded = await _body(answer)
        except aiohttp.ClientError as exc:
            raise ControllerError(f"{method} {path}: no answer from {self.url}: {exc}") from None
        except TimeoutError:
            raise ControllerError(f"{method} {path}: {self.url} did not answer in time") from None
        if answer.status >= 400:
            raise ControllerError(_message(decoded), answer.status)
        return decoded

    async def upload(self, path: str, file: Path) -> Any:
        """``POST`` the file's bytes to ``path`` (an image upload); the decoded answer.

        The upload has no total time limit (a large image over a slow link takes long); only
        connecting and each wait for the answer's bytes are bounded.

        :raises ControllerError: as :meth:`call`.
        """
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=UPLOAD_READ_TIMEOUT
        )
        try:
            with file.open("rb") as content:
                async with self._http.post(
                    self._api + path, data=content, headers=self._headers, timeout=timeout
                ) as answer:
                    decoded = await _body(answer)
        except aiohttp.ClientError as exc:
            raise ControllerError(f"upload of {file}: {exc}") from None
        except TimeoutError:
            raise ControllerError(f"upload of {file}: {self.url} did not answer in time") from None
        if answer.status >= 400:
            raise ControllerError(f"upload of {file}: {_message(decoded)}", answer.status)
        return decoded

    async def stream(self, path: str) -> AsyncIterator[bytes]:
        """The body of a streaming answer (a capture), chunk by chunk, until it ends.

        :raises ControllerError: as :meth:`call`.
        """
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        try:
            async with self._http.get(
                self._api + path, headers=self._headers, timeout=timeout
            ) as answer:
                if answer.status >= 400:
                    raise ControllerError(_message(await _body(answer)), answer.status)
                async for chunk in answer.content.iter_any():
                    yield chunk
        except aiohttp.ClientError as exc:
            raise ControllerError(f"GET {path}: {exc}") from None

    async def notifications(self, project_id: str) -> aiohttp.ClientWebSocketResponse:
        """The project's notification WebSocket (close it when done).

        While it is open the controller knows a client watches the project; a project
        created with ``auto_close`` closes (its nodes stop) a few seconds after the last
        such client leaves, even when the client died without a word.

        :raises ControllerError: it cannot be opened.
        """
        url = self._api.replace("http", "ws", 1) + f"/projects/{project_id}/notifications/ws"
        try:
            return await self._http.ws_connect(url, params={"token": self.token}, heartbeat=30)
        except aiohttp.ClientError as exc:
            raise ControllerError(f"project notifications of {project_id}: {exc}") from None
        except TimeoutError:
            raise ControllerError(
                f"project notifications of {project_id}: {self.url} did not answer in time"
            ) from None

    async def close(self) -> None:
        """End the HTTP session."""
        await self._http.close()


async def _body(answer: aiohttp.ClientResponse) -> Any:
    raw = await answer.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]


def _message(body: Any) -> str:
    """The controller's own message in an error body."""
    if isinstance(body, dict):
        for key in ("message", "detail"):
            if key in body:
                return str(body[key])
    return str(body)
