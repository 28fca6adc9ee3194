"""The Jupyter server and the kernel: who can reach them, and whether they ask who is asking.

Looks at the ``jupyter_server_config.*`` / ``jupyter_notebook_config.*`` files on the Jupyter
config path (Python files are parsed, never run), the runtime files of running servers
(``jpserver-*.json``, plus the sockets actually listening on their port, from ``/proc/net``)
and kernel connection files (``kernel-*.json``, and this kernel's own).
"""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import Context, check
from .report import Finding, mode_finding

_APPS = ("ServerApp", "NotebookApp")
_CONFIG_STEMS = ("jupyter_server_config", "jupyter_notebook_config")
_MAX_CONFIG = 4 * 1024 * 1024
_WILDCARDS = ("", "*", "0.0.0.0", "::")


def _read_text(path: Path) -> str | None:
    """A config or runtime file's text; ``None`` for anything but a regular file of sane size
    (a FIFO or ``/dev/zero`` planted in a shared runtime folder must not hang the doctor)."""
    from .keys import read_regular

    data = read_regular(path, _MAX_CONFIG)
    if data is None or len(data) > _MAX_CONFIG:
        return None
    return data.decode("utf-8", errors="replace")


def runtime_dir() -> Path:
    """Jupyter's runtime folder (``$JUPYTER_RUNTIME_DIR`` first, as jupyter_core does)."""
    env = os.environ.get("JUPYTER_RUNTIME_DIR")
    if env:
        return Path(env).expanduser()
    with contextlib.suppress(ImportError):
        from jupyter_core.paths import jupyter_runtime_dir

        return Path(jupyter_runtime_dir())
    data = os.environ.get("JUPYTER_DATA_DIR") or str(
        Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "jupyter"
    )
    return Path(data) / "runtime"


def config_dirs() -> list[Path]:
    """The Jupyter config path, highest priority first (the user's folder, then the system's)."""
    with contextlib.suppress(ImportError):
        from jupyter_core.paths import jupyter_config_path

        return [Path(p) for p in jupyter_config_path()]
    user = os.environ.get("JUPYTER_CONFIG_DIR") or str(Path.home() / ".jupyter")
    extra = [p for p in os.environ.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep) if p]
    system = [Path(sys.prefix) / "etc" / "jupyter", Path("/usr/local/etc/jupyter")]
    return [Path(user), *map(Path, extra), *system, Path("/etc/jupyter")]


# -- reading settings ------------------------------------------------------------------------


def _py_config(path: Path) -> dict[str, Any]:
    """``c.ServerApp.ip = "0.0.0.0"`` style assignments with literal values (never executed)."""
    text = _read_text(path)
    try:
        tree = ast.parse(text or "")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    out: dict[str, Any] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            t = target
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Attribute)
                and isinstance(t.value.value, ast.Name)
                and t.value.value.id == "c"
            ):
                with contextlib.suppress(ValueError, SyntaxError, TypeError):
                    out[f"{t.value.attr}.{t.attr}"] = ast.literal_eval(node.value)
    return out


def _json_config(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_read_text(path) or "null")
    except (ValueError, RecursionError):
        return {}
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for section, values in doc.items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
    return out


def _config_files(folder: Path) -> Iterator[Path]:
    for stem in _CONFIG_STEMS:
        sub = folder / f"{stem}.d"
        if sub.is_dir():
            yield from sorted(sub.glob("*.json"))
        for ext in (".json", ".py"):
            if (folder / f"{stem}{ext}").is_file():
                yield folder / f"{stem}{ext}"


def effective_config(dirs: list[Path]) -> dict[str, tuple[Any, Path]]:
    """Each setting's value and the file it came from (the user's folder overrides the system)."""
    merged: dict[str, tuple[Any, Path]] = {}
    for folder in reversed(dirs):
        for path in _config_files(folder):
            values = _py_config(path) if path.suffix == ".py" else _json_config(path)
            merged.update({k: (v, path) for k, v in values.items()})
    return merged


# -- judging one server ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = (host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", "*", "0.0.0.0"-like wildcards and host names: assume reachable


@dataclass
class ServerView:
    """What is known about one server (from config or from a runtime file)."""

    where: str
    ip: str | None = None  # None: not set (Jupyter's default is localhost)
    token_off: bool = False
    password: bool = False
    tls: bool = False
    allow_origin: str | None = None
    xsrf_off: bool = False


def _server_findings(s: ServerView) -> list[Finding]:
    found = []
    exposed = s.ip is not None and not is_loopback(s.ip)
    shown_ip = "all interfaces" if s.ip in _WILDCARDS else s.ip
    auth_off = s.token_off and not s.password
    if auth_off:
        found.append(
            Finding(
                id="server:auth-off-exposed" if exposed else "server:auth-off",
                severity="high" if exposed else "medium",
                title=(
                    f"Jupyter server without token or password listening on {shown_ip}"
                    if exposed
                    else "Jupyter server without token or password (any local user or web page "
                    "reaching localhost can run code)"
                ),
                evidence=f"{s.where}: token disabled, no password"
                + (f", ip={s.ip!r}" if s.ip is not None else ""),
                fix="remove the empty token setting (a token is generated) or set a password: "
                "jupyter server password",
                check="server",
            )
        )
    if exposed and not s.tls:
        found.append(
            Finding(
                id="server:no-tls",
                severity="medium",
                title=f"Jupyter server on {shown_ip} without TLS: tokens, code and data "
                "cross the network in clear text",
                evidence=f"{s.where}: ip={s.ip!r}, no certfile",
                fix="listen on localhost and tunnel (ssh -L 8888:localhost:8888 host), or set "
                "ServerApp.certfile/keyfile",
                check="server",
            )
        )
    elif exposed:
        found.append(
            Finding(
                id="server:exposed",
                severity="low",
                title=f"Jupyter server listens beyond localhost ({shown_ip})",
                evidence=f"{s.where}: ip={s.ip!r}",
                fix="jupyter lab --ip=127.0.0.1 unless remote access is intended",
                check="server",
            )
        )
    if s.allow_origin is not None and s.allow_origin.strip() in ("*", ".*"):
        found.append(
            Finding(
                id="server:allow-origin-any",
                severity="high" if auth_off else "medium",
                title='Jupyter server accepts cross-origin requests from any site (allow_origin "*")',
                evidence=f"{s.where}: allow_origin={s.allow_origin!r}",
                fix="remove ServerApp.allow_origin (or list the exact origins you need)",
                check="server",
            )
        )
    if s.xsrf_off:
        found.append(
            Finding(
                id="server:xsrf-off",
                severity="medium",
                title="Jupyter server has XSRF protection disabled",
                evidence=f"{s.where}: disable_check_xsrf=True",
                fix="remove ServerApp.disable_check_xsrf",
                check="server",
            )
        )
    return found


def _view_from_config(cfg: dict[str, tuple[Any, Path]]) -> ServerView | None:
    def get(key: str, sections: tuple[str, ...] = _APPS) -> tuple[Any, Path] | None:
        for sec in sections:
            if f"{sec}.{key}" in cfg:
                return cfg[f"{sec}.{key}"]
        return None

    ip = get("ip")
    token = get("token", (*_APPS, "IdentityProvider"))
    pw = get("password") or get("hashed_password", ("PasswordIdentityProvider",))
    cert = get("certfile")
    origin = get("allow_origin")
    xsrf = get("disable_check_xsrf")
    used = [x for x in (ip, token, pw, cert, origin, xsrf) if x is not None]
    if not used:
        return None
    files = sorted({str(p) for _, p in used})
    return ServerView(
        where="config " + ", ".join(files),
        ip=str(ip[0]) if ip else None,
        token_off=bool(token) and token[0] == "",
        password=bool(pw and pw[0]),
        tls=bool(cert and cert[0]),
        allow_origin=str(origin[0]) if origin else None,
        xsrf_off=bool(xsrf and xsrf[0] is True),
    )


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _listen_addrs(port: int) -> list[str]:
    """Addresses with a listening TCP socket on ``port`` (Linux ``/proc/net``; else empty)."""
    addrs = []
    for name, width in (("tcp", 8), ("tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) < 4 or parts[3] != "0A":  # 0A = LISTEN
                    continue
                hexaddr, hexport = parts[1].split(":")
                if int(hexport, 16) != port or len(hexaddr) != width:
                    continue
                raw = bytes.fromhex(hexaddr)
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addrs.append(str(ipaddress.ip_address(raw)))
    return addrs


def _cmdline_settings(pid: int) -> dict[str, str]:
    """``--ServerApp.allow_origin=*`` style options on a running server's command line
    (``/proc/PID/cmdline``; empty elsewhere). Keys are ``Section.name`` as in config files."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return {}
    args = [a.decode("utf-8", errors="replace") for a in raw.split(b"\0") if a]
    out: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq:  # --ServerApp.allow_origin '*' (traitlets also takes the next argument)
            nxt = args[i + 1] if i + 1 < len(args) else ""
            value = "True" if nxt.startswith("--") or not nxt else nxt
        out[name] = value
    return out


def _option(cmd: dict[str, str], name: str) -> str | None:
    return next((cmd[f"{a}.{name}"] for a in _APPS if f"{a}.{name}" in cmd), None)


def _truthy(value: str | None) -> bool:
    return str(value).strip().strip("'\"").lower() in ("true", "1", "yes")


def _owner_only(path: Path) -> bool:
    try:
        return not (path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return True


def _runtime_servers(rt: Path, ctx: Context) -> Iterator[tuple[Path, ServerView]]:
    stale = 0
    for path in sorted([*rt.glob("jpserver-*.json"), *rt.glob("nbserver-*.json")]):
        try:
            info = json.loads(_read_text(path) or "null")
        except (ValueError, RecursionError):
            continue
        if not isinstance(info, dict):
            continue
        if not _pid_alive(info.get("pid")):
            stale += 1
            continue
        ip = str(info.get("hostname", "localhost"))
        port = info.get("port")
        where = f"running server pid {info.get('pid')} ({path.name}, port {port})"
        if isinstance(port, int):
            wide = [a for a in _listen_addrs(port) if not is_loopback(a)]
            if wide and is_loopback(ip):
                where += f"; its file says {ip} but a socket listens on {wide[0]}"
                ip = wide[0]
        # Options given on the command line are not in the runtime file.
        cmd = _cmdline_settings(info["pid"])
        origin = _option(cmd, "allow_origin")
        view = ServerView(
            where=where,
            ip=ip,
            token_off=not info.get("token"),
            password=bool(info.get("password")),
            tls=bool(info.get("secure")),
            allow_origin=origin.strip("'\"") if origin is not None else None,
            xsrf_off=_truthy(_option(cmd, "disable_check_xsrf")),
        )
        yield path, view
    if stale:
        ctx.note(f"{stale} stale server file(s) in {rt} ignored (their process is gone)")


def _mode_finding(path: Path, fid: str, what: str) -> Finding:
    title = f"{what} is readable by other users"
    return mode_finding(path, id=fid, severity="high", title=title, check="server")


_KERNEL_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def _kernel_gone(info: dict[str, Any]) -> bool:
    """A local TCP kernel none of whose five ports is listening: its process is gone (the file
    was left behind by a crash). Only judged where ``/proc/net`` can tell, and only for kernels
    on this machine (loopback or all interfaces); a remote address is always reported."""
    ip = str(info.get("ip", "127.0.0.1"))
    ports = [info.get(p) for p in _KERNEL_PORTS]
    if info.get("transport", "tcp") != "tcp" or not all(isinstance(p, int) for p in ports):
        return False
    if not (is_loopback(ip) or ip in _WILDCARDS) or not Path("/proc/net/tcp").exists():
        return False
    return not any(_listen_addrs(p) for p in ports)


def _kernel_findings(path: Path, ctx: Context | None = None, own: bool = False) -> list[Finding]:
    try:
        info = json.loads(_read_text(path) or "null")
    except (ValueError, RecursionError):
        return []
    if not isinstance(info, dict):
        return []
    if not own and _kernel_gone(info):
        if ctx is not None:
            ctx.note(f"kernel file {path.name} ignored: no kernel listens on its ports")
        return []
    found = []
    transport, ip = info.get("transport", "tcp"), str(info.get("ip", "127.0.0.1"))
    curve = bool(info.get("curve_secretkey"))
    if transport == "tcp" and not curve and not is_loopback(ip):
        found.append(
            Finding(
                id="kernel:tcp-exposed",
                severity="high",
                title=f"kernel listens on {ip} over TCP without encryption (no CurveZMQ): "
                "everything it sends, secrets included, crosses the network in clear",
                evidence=f"{path}: transport=tcp, ip={ip!r}, no curve key",
                fix="start kernels on 127.0.0.1 (--ip=127.0.0.1) and tunnel over ssh",
                check="server",
            )
        )
    elif transport == "tcp" and not curve:
        found.append(
            Finding(
                id="kernel:tcp-no-curve",
                severity="low",
                title="kernel traffic is unencrypted TCP on loopback (no CurveZMQ): readable by "
                "anyone who can capture local traffic",
                evidence=f"{path}: transport=tcp, ip={ip!r}, no curve key",
                fix="jupyter lab --KernelManager.transport=ipc (Unix sockets, file permissions)",
                check="server",
            )
        )
    if not info.get("key"):
        found.append(
            Finding(
                id="kernel:no-key",
                severity="high",
                title="kernel messages are not signed (empty key): anyone who can connect can "
                "run code",
                evidence=f"{path}: key is empty",
                fix="restart the kernel without --Session.key='' (a random key is generated)",
                check="server",
            )
        )
    if not _owner_only(path):
        found.append(_mode_finding(path, "kernel:connection-file-mode", "kernel connection file"))
    return found


@check("server")
def check_server(ctx: Context) -> list[Finding]:
    found: list[Finding] = []
    dirs = config_dirs()
    view = _view_from_config(effective_config(dirs))
    if view is not None:
        found.extend(_server_findings(view))
    rt = runtime_dir()
    if not rt.is_dir():
        ctx.note(f"no Jupyter runtime folder at {rt}: no running server or kernel to inspect")
    else:
        for path, sv in _runtime_servers(rt, ctx):
            found.extend(_server_findings(sv))
            if sv.token_off is False and not _owner_only(path):
                found.append(_mode_finding(path, "server:runtime-file-mode", "server token file"))
        secret = rt / "jupyter_cookie_secret"
        if secret.is_file() and not _owner_only(secret):
            found.append(_mode_finding(secret, "server:cookie-secret-mode", "cookie secret"))
    kernels = sorted(rt.glob("kernel-*.json")) if rt.is_dir() else []
    own = ctx.kernel_connection_file
    if own is not None:
        from .keys import safe_resolve

        mine = safe_resolve(own) or own
        kernels = [own] + [k for k in kernels if (safe_resolve(k) or k) != mine]
    for path in kernels:
        found.extend(_kernel_findings(path, ctx, own=path == own))
    return found
