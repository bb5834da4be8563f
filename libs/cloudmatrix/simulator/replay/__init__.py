"""Request-level simulation in virtual time: a trace replayed through the serving system's own
schedulers, with every step priced by the cost model (docs/simulator.md, "Request-level")."""
