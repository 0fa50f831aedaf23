"""The ``spliteasy`` command line. One module per subcommand; heavy imports happen in ``run``."""
