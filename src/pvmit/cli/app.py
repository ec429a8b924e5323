"""The root of the `pvmit` command: global options, sub-command groups and error handling.

Exit status: 0 success; 1 a check failed or the job could not be done; 2 bad input (usage, files, names).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pvmit import __version__
from pvmit.cli.state import State
from pvmit.errors import PvmitError
from pvmit.safetext import clean_message


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--catalog", "catalogs", multiple=True, metavar="PATH", type=click.Path(path_type=Path),
              help="An operator's catalog file (TOML) added to the built-in one; repeatable.")
@click.version_option(__version__, prog_name="pvmit", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, catalogs: tuple[Path, ...]) -> None:
    """pvmit: guests report the software Spectre mitigations they rely on; the hypervisor forces the
    IA32_SPEC_CTRL controls that make up for them on the host they run on now."""
    ctx.obj = State(list(catalogs))


def _register() -> None:
    from pvmit.cli import (
        bench_cmd,
        catalog_cmd,
        demo_cmd,
        fleet_cmd,
        guest_cmd,
        host_cmd,
        libvirt_cmd,
        oracle_cmd,
        policy_cmd,
        pool_cmd,
        run_cmd,
        tls_cmd,
        verify_cmd,
        vmm_cmd,
    )

    cli.add_command(catalog_cmd.catalog)
    cli.add_command(policy_cmd.policy)
    cli.add_command(run_cmd.run)
    cli.add_command(bench_cmd.bench)
    cli.add_command(vmm_cmd.vmm)
    cli.add_command(vmm_cmd.migrate)
    cli.add_command(vmm_cmd.ctl)
    cli.add_command(demo_cmd.demo)
    cli.add_command(verify_cmd.verify)
    cli.add_command(catalog_cmd.decode_cmd)
    cli.add_command(host_cmd.host)
    cli.add_command(guest_cmd.guest)
    cli.add_command(oracle_cmd.oracle)
    cli.add_command(fleet_cmd.fleet)
    cli.add_command(libvirt_cmd.libvirt)
    cli.add_command(tls_cmd.tls)
    cli.add_command(pool_cmd.pool)


_register()


class _CleanStderr:
    """stderr for click's own messages, which quote values given on the command line in full."""

    def write(self, text: str) -> int:
        return sys.stderr.write(clean_message(text))

    def flush(self) -> None:
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: pvmit's errors become one line on stderr and an exit status."""
    try:
        rv = cli.main(args=argv, prog_name="pvmit", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show(file=_CleanStderr())  # type: ignore[arg-type]
        sys.exit(2)
    except click.exceptions.Abort:
        print("pvmit: aborted", file=sys.stderr)
        sys.exit(130)
    except PvmitError as e:
        print(f"pvmit: error: {clean_message(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:  # e.g. stdout on a full disk
        print(f"pvmit: error: {clean_message(str(e.strerror or e))}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
