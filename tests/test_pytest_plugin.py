"""The emu pytest plugin, tested the way pytest plugins are: with pytester, in subprocesses."""

from __future__ import annotations

import pytest

from tests.helpers import processes_mentioning

pytestmark = pytest.mark.qemu


def test_a_session_that_does_not_use_it_imports_nothing_of_emu(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import sys

        def test_plain():
            assert not [m for m in sys.modules if m.startswith(("emucore", "emu_qemu", "emu_vpcs"))]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixtures_boot_link_and_clean_up_even_when_a_test_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_ping(emu_run, qemu_node, guest_console, lab):
            async def body():
                a = await qemu_node("a", ip="10.0.0.1/24")
                b = await qemu_node("b", ip="10.0.0.2/24")
                await lab.link(a, "b:0")
                console = await guest_console(a)
                status, out = await console.run("ping -c 2 10.0.0.2")
                assert status == 0, out
            emu_run(body())

        def test_fails_with_a_node_running(emu_run, qemu_node):
            async def body():
                await qemu_node("left")
                assert False, "on purpose"
            emu_run(body())

        def test_one_plugin_for_one_test(emu_plugin_manager):
            import types
            from emucore import hookimpl
            extra = types.ModuleType("extra")
            @hookimpl
            def emu_build_args(node):
                return None
            extra.emu_build_args = emu_build_args
            emu_plugin_manager.register(extra, name="extra")
            assert emu_plugin_manager.get_plugin("extra") is extra
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--basetemp={pytester.path / 'tmp'}"
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: on purpose*"])
    assert processes_mentioning(str(pytester.path / "tmp")) == {}


def test_a_missing_qemu_binary_skips_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_boot(emu_run, qemu_node):
            emu_run(qemu_node("x"))
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--emu-qemu=qemu-system-nowhere", "-rs"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*QEMU binary 'qemu-system-nowhere' is not installed*"])


def test_options_reach_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_settings(emu_settings, tiny_guest):
            assert emu_settings.emulators["qemu"]["kvm"] == "off"
            assert tiny_guest.version == "custom"
        """
    )
    from emu_tests.guest import build_tiny_guest

    guest = build_tiny_guest()
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--emu-kvm=off",
        f"--emu-kernel={guest.kernel}",
        f"--emu-initrd={guest.initrd}",
    )
    result.assert_outcomes(passed=1)


def test_a_saved_lab_boots_once_and_each_test_gets_it_back(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".toml",
        pair="""
        name = "pair"
        [nodes.a]
        image = "tiny"
        ip = "10.0.0.1/24"
        [nodes.b]
        image = "tiny"
        ip = "10.0.0.2/24"
        [[links]]
        endpoints = ["a:0", "b:0"]
        [[checks]]
        node = "a"
        command = "ping -c 1 10.0.0.2"
        expect = "1 packets received"
        """,
    )
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def pair(saved_lab):
            return saved_lab("pair.toml", check=True)
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("turn", range(3))
        def test_each_gets_the_saved_moment(emu_run, warm_lab, pair, guest_console, turn):
            async def body():
                lab = await warm_lab(pair)
                a = lab.session.node("a")
                console = await guest_console(a)
                status, _ = await console.run("test -e /tmp/dirty")
                assert status == 1, "a file an earlier test wrote survived"
                assert (await console.run("touch /tmp/dirty"))[0] == 0
                status, out = await console.run("ping -c 1 -W 2 10.0.0.2")
                assert status == 0, out
                log = (a.directory / "console.log").read_text(errors="replace")
                assert "EMU-GUEST-READY" not in log, "the guest booted"
            emu_run(body())
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--emu-kvm=off", f"--basetemp={pytester.path / 'tmp'}"
    )
    result.assert_outcomes(passed=3)
    assert processes_mentioning(str(pytester.path / "tmp")) == {}
