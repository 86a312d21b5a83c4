"""Check what debian/rules bundled: exactly the distributions debian/requirements.txt pins, at those versions,
and fleetprov at the package's version; nothing else (a wheel from a find-links in some pip configuration
would show up here).

Usage: python3 debian/check-bundle.py SITE_PACKAGES REQUIREMENTS FLEETPROV_VERSION
"""

import re
import sys
from pathlib import Path


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(site: Path, requirements: Path, version: str) -> int:
    wanted = {"fleetprov": version}
    for line in requirements.read_text().splitlines():
        pin = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if pin:
            wanted[normalized(pin[1])] = pin[2]
    bundled = {}
    for metadata in site.glob("*.dist-info/METADATA"):
        fields = dict(re.findall(r"^(Name|Version): (.*)$", metadata.read_text(errors="replace"), re.MULTILINE))
        bundled[normalized(fields["Name"])] = fields["Version"]
    if bundled != wanted:
        for name in sorted(set(bundled) | set(wanted)):
            if bundled.get(name) != wanted.get(name):
                print(f"{name}: bundled {bundled.get(name)}, wanted {wanted.get(name)}", file=sys.stderr)
        return 1
    print(f"bundled as pinned: {', '.join(f'{name} {bundled[name]}' for name in sorted(bundled))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
