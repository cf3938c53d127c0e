"""Build DVC's offline plots page: vega 5, vega-lite 5 and vega-embed 6 inlined from npm.

`dvc plots show` and `dvc plots diff` fill an HTML page whose <script> tags load vega, vega-lite
and vega-embed from cdn.jsdelivr.net (dvc-render's `VegaRenderer.SCRIPTS`): without internet the
page is blank. This script packs the pinned releases from the npm registry (`npm pack`, which
checks each tarball against the registry's integrity hash), checks the tarball's SHA-512 and the
UMD bundle's SHA-256 (`package/build/*.min.js`) against the lock file, and writes a page template
with the three bundles inline, each `<script>` tagged with its package and SHA-256.

dvc-render's `HTML.embed` substitutes three placeholders by plain string replacement:
`{plot_divs}` (required: one <div> per plot), `{refresh_tag}` and `{scripts}`. The template has
the first two and deliberately not `{scripts}`, so DVC's CDN tags are dropped and the page makes
no network request. The bundles must not contain any of the three placeholders or `</script`
(checked here), or the replacement and the HTML parser would cut them.

The page and its lock are committed (about 830 kB), so `dvc plots show` works on a fresh clone
without node; `plots.html_template` in .dvc/config points at it.

Usage:
  python scripts/vega_template.py --check   verify the committed page against the lock (offline)
  python scripts/vega_template.py           rebuild from npm; fail unless every hash equals the lock
  python scripts/vega_template.py --update  rebuild and rewrite the lock (after changing PINS)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"
LOCK = ROOT / ".dvc" / "plots" / "offline.lock.json"

# package -> (version, UMD bundle inside the tarball). Order matters: vega-lite needs the global
# `vega`, vega-embed needs `vega` and `vegaLite`. vega-embed 6 declares the peer `vega ^5.21`.
PINS: dict[str, tuple[str, str]] = {
    "vega": ("5.33.1", "package/build/vega.min.js"),
    "vega-lite": ("5.23.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "package/build/vega-embed.min.js"),
}
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
SCRIPT_RE = re.compile(
    r'<script data-package="([^"@]+)@([^"]+)" data-sha256="([0-9a-f]{64})">(.*?)</script>', re.DOTALL
)

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Offline page for `dvc plots show/diff`: {libs} inlined from the npm registry
         (BSD-3-Clause); rebuilt and verified by scripts/vega_template.py against offline.lock.json. -->
{inlined}
    <script>
        // SVG output: vector curves (crisp when zoomed or printed, inspectable in the DOM);
        // vega-embed's own default is canvas. DVC's page calls vegaEmbed(el, spec).
        window.vegaEmbed = (function (embed) {
            return function (el, spec, opts) { return embed(el, spec, Object.assign({renderer: "svg"}, opts)); };
        })(window.vegaEmbed);
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sri_sha512(data: bytes) -> str:
    """Subresource-integrity form of SHA-512, as npm's `dist.integrity` states it."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def npm_pack(name: str, version: str, dest: Path) -> Path:
    """Download `name@version` from the npm registry into `dest` as a tarball; returns its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not installed: install node/npm, or keep the committed template")
    proc = subprocess.run(
        [npm, "pack", f"{name}@{version}", "--json", "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        check=False,
        cwd=dest,
    )
    if proc.returncode != 0:
        raise SystemExit(f"npm pack {name}@{version} failed: {proc.stderr.strip()[-500:]}")
    (info,) = json.loads(proc.stdout)
    return dest / info["filename"]


def bundle(name: str, version: str, member: str, tmp: Path, lock: dict | None) -> tuple[bytes, dict]:
    """The verified UMD bundle of one package and its lock entry."""
    tarball = npm_pack(name, version, tmp)
    tar_bytes = tarball.read_bytes()
    with tarfile.open(tarball, "r:gz") as tar:
        fobj = tar.extractfile(member)
        if fobj is None:
            raise SystemExit(f"{tarball.name} has no regular file {member}")
        js = fobj.read()
        pkg = json.load(tar.extractfile("package/package.json"))
    if pkg.get("version") != version:
        raise SystemExit(f"{tarball.name}: package.json says version {pkg.get('version')}, expected {version}")
    text = js.decode("utf-8")
    bad = [p for p in (*PLACEHOLDERS, "</script") if p in text.lower()]
    if bad:
        raise SystemExit(f"{name}@{version} {member} contains {bad}: it cannot be inlined into DVC's template")
    entry = {
        "version": version,
        "file": member.removeprefix("package/"),
        "tarball_integrity": sri_sha512(tar_bytes),
        "sha256": sha256(js),
        "bytes": len(js),
        "license": pkg.get("license"),
    }
    if lock is not None:
        want = lock.get(name)
        if want != entry:
            raise SystemExit(
                f"{name}: built {json.dumps(entry)} but the lock says {json.dumps(want)}; "
                "if the pins changed on purpose, rerun with --update"
            )
    return js, entry


def render(scripts: list[tuple[str, str, bytes]]) -> bytes:
    """The page template with each (name, version, bundle) inline, in order."""
    inlined = "\n".join(
        f'<script data-package="{n}@{v}" data-sha256="{sha256(js)}">{js.decode("utf-8")}</script>'
        for n, v, js in scripts
    )
    libs = ", ".join(f"{n} {v}" for n, v, _ in scripts)
    return PAGE.replace("{libs}", libs).replace("{inlined}", inlined).encode("utf-8")


def check(template: Path = TEMPLATE, lock_path: Path = LOCK) -> list[str]:
    """Problems with the committed page: placeholders, and every inlined bundle against the lock."""
    text = template.read_text(encoding="utf-8")
    lock = json.loads(lock_path.read_text(encoding="utf-8"))
    problems = []
    if text.count("{plot_divs}") != 1:
        problems.append("the template must contain DVC's {plot_divs} placeholder exactly once")
    if "{scripts}" in text:
        problems.append("the template contains {scripts}: DVC would add its CDN <script> tags")
    found = SCRIPT_RE.findall(text)
    if [name for name, *_ in found] != list(PINS):
        problems.append(f"inlined packages {[n for n, *_ in found]}, expected {list(PINS)} in that order")
    for name, version, tagged, js in found:
        want = lock.get(name, {})
        actual = sha256(js.encode("utf-8"))
        if version != want.get("version") or actual != want.get("sha256") or tagged != actual:
            problems.append(
                f"{name}@{version}: inlined sha256 {actual} (tag {tagged}), lock says "
                f"{want.get('version')} {want.get('sha256')}"
            )
    if not problems and render([(n, v, js.encode("utf-8")) for n, v, _, js in found]) != text.encode("utf-8"):
        problems.append("the page differs from the one this script writes around these bundles: rebuild it")
    if re.search(r"<script[^>]+\bsrc=", text):
        problems.append("the template loads a script from elsewhere")
    return problems


def build(update: bool) -> None:
    lock = None if update else json.loads(LOCK.read_text(encoding="utf-8"))
    scripts, entries = [], {}
    with tempfile.TemporaryDirectory(prefix="vega-npm-") as tmp:
        for name, (version, member) in PINS.items():
            js, entries[name] = bundle(name, version, member, Path(tmp), lock)
            scripts.append((name, version, js))
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_bytes(render(scripts))
    if update:
        LOCK.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    problems = check()
    if problems:
        raise SystemExit("\n".join(problems))
    print(
        f"wrote {TEMPLATE.relative_to(ROOT)} ({TEMPLATE.stat().st_size} bytes): "
        + ", ".join(f"{n} {v} sha256 {entries[n]['sha256'][:12]}" for n, v, _ in scripts)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify the committed page against the lock (offline)")
    mode.add_argument("--update", action="store_true", help="rebuild from npm and rewrite the lock")
    args = p.parse_args(argv)
    if args.check:
        problems = check()
        print("\n".join(problems) or f"{TEMPLATE.relative_to(ROOT)}: every inlined bundle matches the lock")
        return 1 if problems else 0
    build(update=args.update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
