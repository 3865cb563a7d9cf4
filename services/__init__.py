"""The application: settings, database, sweeps, run lifecycle, metrics and the dispatcher."""
