"""Operator commands: connections, flows, status, audit, dead letters."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from services.cli import _context, _fail, _json, _pool, _run, main
from shared.settings import load_settings

# -- connections --------------------------------------------------------------------------------


@main.group()
def connections() -> None:
    """External systems: add, list, show, remove, ping."""


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            _fail(f"--set takes NAME=VALUE, got {item!r}", 2)
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


MAX_JSON_INPUT = 1_000_000  # bytes of a settings or secrets file (or stdin)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object from a file or stdin, or one line saying why not (binary, not UTF-8,
    not JSON, not an object, too big); never the content, which may be a secret."""
    if len(raw) > MAX_JSON_INPUT:
        _fail(f"{what} is larger than {MAX_JSON_INPUT:,} bytes: not a JSON object of settings", 2)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _fail(f"{what} is not UTF-8 text (byte {exc.start}): is it the right file?", 2)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{what} is not valid JSON: line {exc.lineno}: {exc.msg}", 2)
    except RecursionError:
        _fail(f"{what} is not valid JSON: nested too deeply", 2)
    if not isinstance(data, dict):
        _fail(f"{what} must hold a JSON object", 2)
    return data


def _read_json_file(path: str, what: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_JSON_INPUT + 1)
    except OSError as exc:
        _fail(f"cannot read {what} {path}: {exc.strerror}", 2)
    return _json_object(raw, f"{what} {path}")


@connections.command("add")
@click.argument("name")
@click.option("--system", required=True, help="syspro, zoho_crm, ...")
@click.option("--set", "sets", multiple=True, help="a setting NAME=VALUE (repeatable)")
@click.option("--settings-file", type=click.Path(dir_okay=False), help="settings as JSON")
@click.option("--secrets-file", type=click.Path(dir_okay=False), help="secrets as JSON")
@click.option("--secrets-stdin", is_flag=True, help="read the secrets as JSON from stdin")
@click.option("--ionapi", type=click.Path(dir_okay=False), help="Infor .ionapi credentials file")
@click.option("--replace", is_flag=True, help="overwrite an existing connection")
def connections_add(
    name: str,
    system: str,
    sets: tuple[str, ...],
    settings_file: str | None,
    secrets_file: str | None,
    secrets_stdin: bool,
    ionapi: str | None,
    replace: bool,
) -> None:
    """Add a connection. Secrets come from a prompt, stdin or a file, never from arguments."""
    from shared.connections import ConnectionConfigError, connector_type

    try:
        kind = connector_type(system)
    except ConnectionConfigError as exc:
        _fail(str(exc), 2)
    settings = _read_json_file(settings_file, "settings file") if settings_file else {}
    settings.update(_parse_sets(sets))
    secrets: dict[str, Any] = {}
    if ionapi:
        from_ionapi = getattr(kind.factory, "from_ionapi", None)
        if from_ionapi is None:
            _fail(f"--ionapi is for Infor connections, not {system}", 2)
        extra_settings, secrets = from_ionapi(ionapi)
        settings = {**extra_settings, **settings}
    if secrets_file:
        secrets.update(_read_json_file(secrets_file, "secrets file"))
    if secrets_stdin:
        raw = sys.stdin.buffer.read(MAX_JSON_INPUT + 1)
        secrets.update(_json_object(raw, "stdin (secrets)"))
    for field_name, info in kind.secrets_model.model_fields.items():
        if field_name in secrets:
            continue
        if not sys.stdin.isatty():
            if info.is_required():
                _fail(
                    f"secret {field_name!r} is missing (use --secrets-file or --secrets-stdin)", 2
                )
            continue
        value = getpass.getpass(f"{field_name} for {name}: ")
        if value or info.is_required():
            secrets[field_name] = value

    async def go() -> None:
        from shared.connections import ConnectionStore
        from shared.vault import Vault

        async with _pool() as pool:
            store = ConnectionStore(pool, Vault.from_settings(load_settings()))
            await store.add(name, system, settings, secrets, replace=replace)

    try:
        _run(go())
    except ConnectionConfigError as exc:
        _fail(str(exc), 2)
    click.echo(
        f"connection {name} ({system}) saved; check it with: ml-connector connections ping {name}"
    )


@connections.command("list")
@click.option("--json", "as_json", is_flag=True)
def connections_list(as_json: bool) -> None:
    """Every connection with its system."""

    async def go() -> list[dict[str, Any]]:
        from shared.connections import ConnectionStore
        from shared.vault import Vault

        async with _pool() as pool:
            return await ConnectionStore(pool, Vault.from_settings(load_settings())).list()

    rows = _run(go())
    if as_json:
        click.echo(_json(rows))
        return
    if not rows:
        click.echo("(no connections: ml-connector connections add NAME --system SYSTEM ...)")
    for row in rows:
        click.echo(f"{row['name']:<24} {row['system']:<12} key {row['key_id']}")


@connections.command("show")
@click.argument("name")
def connections_show(name: str) -> None:
    """Settings of a connection; secrets are shown as ******** only."""
    from shared.connections import ConnectionConfigError, ConnectionStore
    from shared.vault import Vault, VaultError

    async def go() -> dict[str, Any]:
        async with _pool() as pool:
            stored = await ConnectionStore(pool, Vault.from_settings(load_settings())).get(name)
            return stored.describe()

    try:
        click.echo(_json(_run(go())))
    except (ConnectionConfigError, VaultError) as exc:
        _fail(str(exc))


@connections.command("remove")
@click.argument("name")
def connections_remove(name: str) -> None:
    """Remove a connection and its cached token."""

    async def go() -> bool:
        from shared.connections import ConnectionStore
        from shared.vault import Vault

        async with _pool() as pool:
            used = await pool.fetchval(
                "SELECT string_agg(name, ', ') FROM flows"
                " WHERE source_connection = $1 OR target_connection = $1",
                name,
            )
            if used:
                _fail(f"connection {name} is used by flows: {used}")
            return await ConnectionStore(pool, Vault.from_settings(load_settings())).remove(name)

    if not _run(go()):
        _fail(f"no connection named {name!r}")
    click.echo(f"connection {name} removed")


@connections.command("ping")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def connections_ping(name: str, as_json: bool) -> None:
    """Prove reach, authentication, permissions and API version; exit 1 when something fails."""
    from shared.connections import ConnectionConfigError, ConnectionStore
    from shared.vault import Vault, VaultError

    async def go() -> Any:
        async with _pool() as pool:
            store = ConnectionStore(pool, Vault.from_settings(load_settings()))
            connector = await store.open(name)
            try:
                return await connector.ping()
            finally:
                await connector.close()

    try:
        result = _run(go())
    except (ConnectionConfigError, VaultError) as exc:
        _fail(str(exc))
    if as_json:
        click.echo(_json({"ok": result.ok, "checks": [c.__dict__ for c in result.checks]}))
    else:
        for check in result.checks:
            click.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<12} {check.detail}")
        click.echo(f"{name}: {'reachable and authorised' if result.ok else 'NOT OK'}")
    sys.exit(0 if result.ok else 1)


# -- flows --------------------------------------------------------------------------------------


@main.group()
def flows() -> None:
    """Flows: apply files, list, enable, disable, resync, preview."""


@flows.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def flows_apply(files: tuple[str, ...]) -> None:
    """Validate flow files and store them (a changed flow gets a new version). Every file is
    validated first; then all of them are stored in one transaction, or none."""
    from shared.flow_store import FlowStore
    from shared.flows import FlowFileError, load_flow_file

    parsed = []
    errors = []
    origin: dict[str, str] = {}
    for path in files:
        try:
            flow = load_flow_file(path)
        except FlowFileError as exc:
            errors.append(str(exc))
            continue
        if flow.name in origin:
            errors.append(f"{path}: flow {flow.name!r} is also defined in {origin[flow.name]}")
            continue
        origin[flow.name] = path
        parsed.append((path, flow))
    if errors:
        _fail("invalid flow file (nothing applied):\n" + "\n".join(errors), 2)

    async def go() -> list[str]:
        async with _pool() as pool:
            rows = await pool.fetch("SELECT name, system, settings FROM connections")
            known = {r["name"]: (r["system"], r["settings"]) for r in rows}
            missing = [
                f"{path}: flow {flow.name!r}: connection(s) {', '.join(absent)} not found"
                " (ml-connector connections add ...)"
                for path, flow in parsed
                if (absent := [c for c in (flow.source, flow.target) if c not in known])
            ]
            if missing:
                _fail("nothing applied:\n" + "\n".join(missing), 2)
            problems = _capability_problems(parsed, known)
            if problems:
                _fail("nothing applied:\n" + "\n".join(problems), 2)
            results = await FlowStore(pool).apply_all([(f, str(p)) for p, f in parsed])
            return [
                f"{flow.name} v{version} {what}"
                for (_, flow), (version, what) in zip(parsed, results, strict=True)
            ]

    for line in _run(go()):
        click.echo(line)


def _capability_problems(
    parsed: list[tuple[str, Any]], connections: dict[str, tuple[str, Any]]
) -> list[str]:
    """What each flow asks that its connections' capabilities refuse (one line each)."""
    from shared.connectors import registry

    caps: dict[str, tuple[str, registry.Capabilities]] = {}
    problems: list[str] = []
    for path, flow in parsed:
        try:
            for name in (flow.source, flow.target):
                if name not in caps:
                    system, settings = connections[name]
                    caps[name] = (system, registry.capabilities_of(system, settings))
        except registry.ConnectionConfigError:
            continue  # a connection of an unknown system fails where it is opened
        problems += registry.flow_problems(flow, path, caps[flow.source], caps[flow.target])
    return problems


@flows.command("list")
@click.option("--json", "as_json", is_flag=True)
def flows_list(as_json: bool) -> None:
    from shared.flow_store import FlowStore

    async def go() -> list[dict[str, Any]]:
        async with _pool() as pool:
            return await FlowStore(pool).list()

    rows = _run(go())
    if as_json:
        click.echo(_json(rows))
        return
    if not rows:
        click.echo("(no flows: ml-connector flows apply flows/<name>.yaml)")
    for r in rows:
        state = "enabled " if r["enabled"] else "disabled"
        click.echo(
            f"{r['name']:<28} v{r['version']:<3} {state} {r['source_connection']} ->"
            f" {r['target_connection']} every {r['poll_interval_s']} s"
        )


def _toggle(name: str, enabled: bool) -> None:
    from shared.flow_store import FlowNotFoundError, FlowStore

    async def go() -> None:
        async with _pool() as pool:
            await FlowStore(pool).set_enabled(name, enabled)

    try:
        _run(go())
    except FlowNotFoundError as exc:
        _fail(str(exc))
    click.echo(f"flow {name} {'enabled' if enabled else 'disabled'}")


@flows.command("enable")
@click.argument("name")
def flows_enable(name: str) -> None:
    _toggle(name, True)


@flows.command("disable")
@click.argument("name")
def flows_disable(name: str) -> None:
    _toggle(name, False)


@flows.command("resync")
@click.argument("name")
@click.option("--entity", help="only this source entity")
def flows_resync(name: str, entity: str | None) -> None:
    """Reset a flow's cursors: the next poll reads everything again (unchanged records are
    skipped by the writer without an API call)."""
    from shared.flow_store import FlowNotFoundError, FlowStore

    async def go() -> int:
        async with _pool() as pool:
            return await FlowStore(pool).resync(name, entity)

    try:
        n = _run(go())
    except FlowNotFoundError as exc:
        _fail(str(exc))
    click.echo(f"flow {name}: {n} cursor(s) reset; the next poll is a full read")


@flows.command("preview")
@click.argument("name")
@click.option("-n", "--limit", default=5, show_default=True, help="records per entity")
@click.option("--entity", help="only this entity mapping")
@click.option("--json", "as_json", is_flag=True)
def flows_preview(name: str, limit: int, entity: str | None, as_json: bool) -> None:
    """Map the first N source records and show the payloads and what the writer would do.
    Writes nothing."""
    from services.ops.preview import preview

    async def go() -> list[dict[str, Any]]:
        async with _context() as ctx:
            return await preview(ctx, name, limit, entity)

    try:
        rows = _run(go())
    except LookupError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(_json(rows))
        return
    for row in rows:
        click.echo(f"--- {row['entity']} {row['source_key']}: would {row['action']}")
        if row.get("error"):
            click.echo(f"    error: {row['error']}")
        else:
            click.echo("    " + json.dumps(row["payload"], default=str))


# -- status and audit ---------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Flows, cursors and lag; queues; writer rates. Exit 1 when something needs attention."""
    from services.ops.status import collect, render

    async def go() -> dict[str, Any]:
        async with _context() as ctx:
            return await collect(ctx.pool, ctx.bus)

    result = _run(go())
    click.echo(_json(result) if as_json else render(result))
    sys.exit(0 if result["ok"] else 1)


@main.command()
@click.argument("record", required=False)
@click.option("--failed", is_flag=True, help="failures instead of one record's lineage")
@click.option("--since", default="1h", show_default=True, help="window for --failed")
@click.option("--json", "as_json", is_flag=True)
def audit(record: str | None, failed: bool, since: str, as_json: bool) -> None:
    """A record's lineage (syspro:ArCustomer:C0001 or zoho_crm:Accounts:<id>), or failures."""
    from services.ops.audit_query import failures, lineage, render

    if not record and not failed:
        _fail("give a RECORD (system:entity:key) or --failed", 2)

    after = _since(since) if failed else None

    async def go() -> list[dict[str, Any]]:
        async with _pool() as pool:
            if after is not None:
                return await failures(pool, after)
            return await lineage(pool, record or "")

    try:
        rows = _run(go())
    except ValueError as exc:
        _fail(str(exc), 2)
    if as_json:
        click.echo(_json(rows))
    else:
        click.echo(render(rows))
    if record and not rows:
        sys.exit(1)


# -- dead letters -------------------------------------------------------------------------------


MAX_SINCE_S = 36_500 * 86_400.0  # a hundred years: older than any audit row or dead letter


def _since(value: str | None) -> datetime | None:
    """``--since`` / ``--until`` of ``audit`` and ``dlq``: a duration ago (``1h``, ``7d``; at
    most a hundred years) or an ISO time; anything else is one line and exit status 2."""
    from shared.flows import parse_duration

    if not value:
        return None
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(value, maximum=MAX_SINCE_S))
    except ValueError as exc:
        problem = str(exc)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        if problem.startswith("not a duration"):
            problem = f"not {value[:40]!r}"
        _fail(f"--since/--until takes a duration (1h) or an ISO time: {problem}", 2)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _dlq_filters(f: Any) -> Any:
    for option in (
        click.option("--queue", help="dead-letter queue name or part of it"),
        click.option("--flow"),
        click.option(
            "--error-class",
            type=click.Choice(["throttled", "transient", "auth", "permanent", "broker"]),
            help="the failure class, or 'broker' for letters the broker dead-lettered itself",
        ),
        click.option("--message-id"),
        click.option("--since", help="failed within this window (1h) or after an ISO time"),
        click.option("--until", help="failed before (duration ago or ISO time)"),
        click.option("--limit", default=1000, show_default=True),
    ):
        f = option(f)
    return f


@main.group()
def dlq() -> None:
    """Dead letters: list, show, replay, discard."""


async def _with_letters(kwargs: dict[str, Any], action: Any) -> Any:
    from services.ops.dlq import DeadLetterBrowser, Filters

    filters = Filters(
        queue=kwargs["queue"],
        flow=kwargs["flow"],
        error_class=kwargs["error_class"],
        message_id=kwargs["message_id"],
        since=_since(kwargs["since"]),
        until=_since(kwargs["until"]),
    )
    async with _context() as ctx, DeadLetterBrowser(ctx.bus) as browser:
        letters = await browser.read(filters, kwargs["limit"])
        return await action(ctx, browser, letters)


@dlq.command("list")
@_dlq_filters
@click.option("--json", "as_json", is_flag=True)
def dlq_list(as_json: bool, **kwargs: Any) -> None:
    from services.ops.dlq import superseded

    async def action(ctx: Any, browser: Any, letters: list[Any]) -> list[dict[str, Any]]:
        return [
            {**letter.summary(), "superseded": await superseded(ctx.pool, letter)}
            for letter in letters
        ]

    rows = _run(_with_letters(kwargs, action))
    if as_json:
        click.echo(_json(rows))
        return
    if not rows:
        click.echo("no dead letters")
        return
    for r in rows:
        click.echo(
            f"{r['message_id'][:12]:<13} {r['queue']:<34} {r['reason']:<10}"
            f" attempts {r['attempts'] if r['attempts'] is not None else '?'}"
            f"  {len(r['records'])} record(s)  {_one_line(r['error'])}"
        )
        if r["exception"]:
            click.echo(f"{'':13} exception: {r['exception']}")
        if not r["decoded"]:
            click.echo(
                f"{'':13} its body is not a valid {r['type'] or 'message'} for this version"
                " (dlq show prints it)"
            )
        if r["superseded"]:
            click.echo(
                f"{'':13} {len(r['superseded'])} of them landed since at a newer version:"
                " replaying those changes nothing; discard them"
            )
    click.echo(f"{len(rows)} dead letter(s)")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dlq.command("show")
@click.argument("message_id")
@click.option("--queue")
def dlq_show(message_id: str, queue: str | None) -> None:
    kwargs = dict(
        queue=queue,
        flow=None,
        error_class=None,
        message_id=message_id,
        since=None,
        until=None,
        limit=100000,
    )

    async def action(ctx: Any, browser: Any, letters: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                **letter.summary(),
                "headers": letter.headers,
                # the body as JSON, or as text when it is not JSON
                "body": letter.raw if letter.raw is not None else letter.body_text,
            }
            for letter in letters
        ]

    rows = _run(_with_letters(kwargs, action))
    if not rows:
        _fail(f"no dead letter with message id {message_id}")
    click.echo(_json(rows))


def _operator() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = os.environ.get("USER", "unknown")
    return f"operator:{user}"


@dlq.command("replay")
@_dlq_filters
@click.option("--dry-run", is_flag=True, help="show what would be replayed")
@click.option("--force", is_flag=True, help="replay even when the flow is disabled")
def dlq_replay(dry_run: bool, force: bool, **kwargs: Any) -> None:
    """Re-publish dead letters to their original exchange and routing key, with a fresh
    attempt count, recording the replay in the audit trail."""
    from services.ops.dlq import ReplayError, disabled_flows

    async def action(ctx: Any, browser: Any, letters: list[Any]) -> tuple[int, list[str]]:
        replayed, refused = 0, []
        for letter in letters:
            off = await disabled_flows(ctx.flows, letter)
            if off and not force:
                refused.append(
                    f"{letter.message_id}: flow {', '.join(off)} is disabled"
                    " (enable it, or use --force)"
                )
                continue
            if dry_run:
                if not letter.original_routing_key:
                    refused.append(f"{letter.message_id}: it names no original routing key")
                    continue
                click.echo(
                    f"would replay {letter.message_id}"
                    f" -> {letter.original_exchange or '(default exchange)'}"
                    f" {letter.original_routing_key}"
                )
            else:
                try:
                    await browser.replay(letter, audit=ctx.audit, actor=_operator())
                except ReplayError as exc:
                    refused.append(str(exc))
                    continue
            replayed += 1
        return replayed, refused

    count, refused = _run(_with_letters(kwargs, action))
    for line in refused:
        click.echo(f"not replayed: {line}", err=True)
    click.echo(f"{'would replay' if dry_run else 'replayed'} {count} dead letter(s)")
    if refused:
        sys.exit(1)


@dlq.command("discard")
@_dlq_filters
@click.option("--dry-run", is_flag=True)
@click.option("--yes", is_flag=True, help="do not ask")
def dlq_discard(dry_run: bool, yes: bool, **kwargs: Any) -> None:
    """Delete dead letters for good (recorded in the audit trail)."""
    if not dry_run and not yes and sys.stdin.isatty():
        click.confirm("discard the matching dead letters for good?", abort=True)

    async def action(ctx: Any, browser: Any, letters: list[Any]) -> int:
        for letter in letters:
            if dry_run:
                click.echo(f"would discard {letter.message_id} ({letter.queue})")
            else:
                await browser.discard(letter, audit=ctx.audit, actor=_operator())
        return len(letters)

    count = _run(_with_letters(kwargs, action))
    click.echo(f"{'would discard' if dry_run else 'discarded'} {count} dead letter(s)")


@main.command()
@click.option("--short", is_flag=True, help="a quick run (tests, CI)")
@click.option("--customers", type=int, default=None)
@click.option("--invoices", type=int, default=None)
@click.option("--duration", type=float, default=None, help="seconds of ERP changes")
def demo(short: bool, customers: int | None, invoices: int | None, duration: float | None) -> None:
    """Emulated ERP and CRM, every service, records flowing, a summary at the end."""
    from services.demo import DemoOptions, run_demo

    options = DemoOptions.for_mode(short, customers, invoices, duration)
    code = asyncio.run(run_demo(load_settings(), options))
    sys.exit(code)
