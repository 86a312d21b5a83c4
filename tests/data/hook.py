"""Pre-provisioning hook used by the integration tests.

Allows serial numbers starting with "ok-" and renames them through parameterOverrides; denies "deny-";
sleeps past the 5 s limit for "slow-"; crashes for "crash-"; prints garbage for "garbage-".
"""

import json
import sys
import time

event = json.load(sys.stdin)
serial = event["parameters"].get("SerialNumber", "")
if serial.startswith("ok-"):
    print(json.dumps({"allowProvisioning": True, "parameterOverrides": {"SerialNumber": "hooked-" + serial[3:]}}))
elif serial.startswith("slow-"):
    time.sleep(8)
elif serial.startswith("crash-"):
    raise SystemExit(3)
elif serial.startswith("garbage-"):
    print("not json")
else:
    print(json.dumps({"allowProvisioning": False}))
