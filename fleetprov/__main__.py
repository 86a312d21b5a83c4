from fleetprov.cli import main

raise SystemExit(main())
