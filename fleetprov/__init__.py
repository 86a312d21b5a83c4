"""fleetprov: give a factory-fresh Linux device its permanent AWS IoT identity and keep it."""

__version__ = "0.1.0"
