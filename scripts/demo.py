"""`make demo`: start the local AWS IoT emulator, let `fleetprov --once` provision one simulated device through
it end to end (claim -> CreateCertificateFromCsr -> RegisterThing -> store -> reconnect), show the result and
stop the emulator. Offline; everything lives in a temporary directory unless --keep DIR is given.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from fleetprov.emulator.launch import launch


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def fleetprov(*args: str) -> subprocess.CompletedProcess[str]:
    """Run fleetprov with its output shown as it comes (stderr carries the step lines)."""
    return subprocess.run([sys.executable, "-m", "fleetprov", *args], check=False, stdout=subprocess.PIPE, text=True)


def demo(work: Path) -> int:
    state_dir = work / "emulator"
    step(f"start the local AWS IoT emulator (state in {state_dir})")
    emulator = launch(state_dir, log_path=work / "emulator.log")
    try:
        print(f"    listening on {emulator.endpoint['host']}:{emulator.endpoint['port']}")
        step("write a device configuration for it: fleetprov emulator device-config")
        config = work / "device" / "config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        generated = fleetprov(
            "emulator", "device-config", "--state-dir", str(state_dir), "--serial", "demo-0001",
            "--state-dir-for-device", str(work / "device" / "state"),
        )  # fmt: skip
        if generated.returncode != 0:
            return generated.returncode
        config.write_text(generated.stdout)
        print(f"    {config}")

        step(f"provision: fleetprov --once --config {config}")
        once = fleetprov("--once", "--config", str(config))
        print(once.stdout, end="")
        if once.returncode != 0:
            print(f"fleetprov --once failed with exit status {once.returncode}", file=sys.stderr)
            return once.returncode

        step("run it again: an identity that exists is verified, the claim is not used")
        again = fleetprov("--once", "--config", str(config))
        print(again.stdout, end="")

        step("fleetprov status")
        status = fleetprov("status", "--config", str(config))
        print(status.stdout, end="")
        return again.returncode or status.returncode
    finally:
        emulator.stop()
        step("stopped the emulator")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="keep the emulator state and device files in this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetprov-demo-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        result = demo(work)
        if not args.keep:
            print(f"\n(files were in {work}, a temporary directory; pass --keep DIR to keep them)")
    return result


if __name__ == "__main__":
    sys.exit(main())
