"""The project's promises about itself: README commands, CI, CLI conventions."""

from __future__ import annotations

import json
import re

from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^    (python3 -m venv .+)$", text, re.MULTILINE)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main_job, tests = cmds
    assert ".venv/bin/pvmit " in main_job and "pytest" in tests and re.search(r"'\.\[test[],]", tests)
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "CI must run the README's test command verbatim"


def test_errors_go_to_stderr_with_exit_2(cli) -> None:  # type: ignore[no-untyped-def]
    for args in (["decode", "spec_ctrl", "zebra"], ["decode", "nope", "1"], ["catalog", "show", "x"],
                 ["--catalog", "/nonexistent.toml", "catalog", "list"], ["no-such-command"]):
        r = cli(*args)
        assert r.code == 2, (args, r)
        assert r.stdout == "" and r.stderr.strip() and "Traceback" not in r.stderr


def test_json_is_one_document(cli) -> None:  # type: ignore[no-untyped-def]
    for args in (["decode", "arch_capabilities", "0x80000", "--json"], ["catalog", "list", "--json"]):
        r = cli(*args)
        assert r.code == 0
        json.loads(r.stdout)


def test_version(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("--version")
    assert r.code == 0 and r.stdout.startswith("pvmit ")
