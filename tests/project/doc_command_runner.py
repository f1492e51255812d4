# Copyright (c) CT-FM bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Run a list of documented commands in ONE interpreter, one after the other (used by tests/project/test_docs.py).

``python doc_command_runner.py plan.json``: each entry of the plan is ``{"argv", "module" | "entry", "cwd",
"copies", "hashes"}``. Before a command, ``copies`` (``[dst, src]``: an earlier command's output standing in
for a documented placeholder path) are copied when ``dst`` is missing and ``hashes`` (``{TOKEN: file}``)
replace ``TOKEN`` in the arguments by the file's SHA-256. The command then runs as ``python -m <module>``
or the console command of ``entry`` (``module:function``) would run it (``sys.argv``, ``__main__``, the working
directory), so one interpreter
start is shared by the whole list. A bundle's ``scripts`` package is dropped between commands (two bundles
must never share it). Each command starts with a ``@@@ COMMAND <i>`` line on stdout and stderr; the first
success ends with ``@@@ DONE <i> in <seconds> s`` on stdout, the first
failure prints ``@@@ FAILED <i>`` after its traceback and ends the run with exit status 1.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import runpy
import shutil
import sys
import time
import traceback


def _copy(dst: str, src: str) -> None:
    if os.path.exists(dst):
        return
    if not os.path.exists(src):
        raise FileNotFoundError(f"'{src}' (an earlier command's output standing in for '{dst}') does not exist")
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(plan_file: str) -> int:
    with open(plan_file) as f:
        plan = json.load(f)
    base_path = list(sys.path)
    for i, command in enumerate(plan):
        start = time.monotonic()
        for stream in (sys.stdout, sys.stderr):
            print(f"@@@ COMMAND {i}", file=stream, flush=True)
        try:
            for dst, src in command["copies"]:
                _copy(dst, src)
            argv = list(command["argv"])
            for token, path in command["hashes"].items():
                argv = [a.replace(token, _sha256(path)) for a in argv]
            os.chdir(command["cwd"])
            for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
                del sys.modules[name]
            if "module" in command:  # as ``python -m`` and ``python <path>`` start: the folder first on sys.path
                sys.path[:] = [os.getcwd(), *base_path[1:]]
                sys.argv = [command["module"], *argv]
                runpy.run_module(command["module"], run_name="__main__", alter_sys=True)
            else:  # as a console script: sys.exit(function())
                module, _, function = command["entry"].partition(":")
                sys.argv = [command["line"].split()[0], *argv]
                sys.path[:] = base_path[1:]  # not the runner's folder
                code = getattr(importlib.import_module(module), function)()
                if code not in (None, 0):
                    raise SystemExit(code)
        except SystemExit as e:
            if e.code not in (None, 0):
                print(f"exit status {e.code}", file=sys.stderr)
                print(f"@@@ FAILED {i}", file=sys.stderr, flush=True)
                return 1
        except BaseException:  # noqa: BLE001  (the command's own error, reported with its traceback)
            traceback.print_exc()
            print(f"@@@ FAILED {i}", file=sys.stderr, flush=True)
            return 1
        print(f"@@@ DONE {i} in {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
