"""Example pre-provisioning hook for the emulator: allow serial numbers listed in known_serials.txt (next to
this file), or every serial starting with "W" when that file does not exist; put EU serials in the EU group.

Input (stdin) and output (stdout) are the JSON objects AWS documents for pre-provisioning hook Lambdas.
"""

import json
import sys
from pathlib import Path

event = json.load(sys.stdin)
serial = event.get("parameters", {}).get("SerialNumber", "")
known = Path(__file__).with_name("known_serials.txt")
allowed = serial in known.read_text().split() if known.exists() else serial.startswith("W")
overrides = {"Region": "eu"} if serial.endswith("-EU") else {}
json.dump({"allowProvisioning": allowed, "parameterOverrides": overrides}, sys.stdout)
