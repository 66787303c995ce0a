#!/usr/bin/env python3
"""Container entrypoint of the kvstore daemon: `${VAR}` in the config file comes from the environment.

`kvstore serve --config` reads secrets only through `auth_token_env` (the daemon token) and boto3's
default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); a Redis password lives in the tier's
`url`. So the config a container mounts may say `url: "${REDIS_URL}"`, and this script substitutes
every `${NAME}` from the environment (an unset or empty one is an error naming it, exit 2), hands the
result to `kvstore serve` through a pipe (/dev/fd/N: the secret never touches a disk or a command
line) and execs it, so the daemon is PID 1 and receives SIGTERM itself.

    kvstore_entrypoint.py --config /etc/kvstore/kvstore.yaml [any other `kvstore serve` flags]
"""

from __future__ import annotations

import os
import re
import sys

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(text: str, env: dict[str, str]) -> str:
    """Replace each `${NAME}` by env[NAME]; a missing or empty one raises KeyError(NAME)."""
    missing = sorted({m.group(1) for m in _VAR.finditer(text) if not env.get(m.group(1))})
    if missing:
        raise KeyError(", ".join(missing))
    return _VAR.sub(lambda m: env[m.group(1)], text)


def main(argv: list[str]) -> int:
    args = list(argv)
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        print("kvstore_entrypoint: usage: kvstore_entrypoint.py --config FILE [kvstore serve flags]", file=sys.stderr)
        return 2
    i = args.index("--config") + 1
    try:
        with open(args[i]) as f:
            text = render(f.read(), dict(os.environ))
    except OSError as err:
        print(f"kvstore_entrypoint: cannot read {args[i]}: {err.strerror}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"kvstore_entrypoint: {args[i]} names unset environment variable(s): {err.args[0]}", file=sys.stderr)
        return 2
    data = text.encode()
    if len(data) > 60_000:  # a pipe holds 64 KiB: the write must not block before kvstore reads it
        print("kvstore_entrypoint: config larger than 60 kB", file=sys.stderr)
        return 2
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    os.set_inheritable(r, True)
    args[i] = f"/dev/fd/{r}"
    os.execvp("kvstore", ["kvstore", "serve", *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
