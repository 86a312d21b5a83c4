from fleetprov.hardening import harden_process

# Before importing the rest: `python -m fleetprov` is how the daemon starts `fleetprov reprovision`, whose
# environment may hold the PIN's variable; until this call, processes of the same user could read it.
harden_process()

from fleetprov.cli import main  # noqa: E402

raise SystemExit(main())
