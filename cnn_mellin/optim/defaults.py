"""Names and defaults of the optim options (kept free of heavy imports for the CLI)."""

PRUNERS = ("hyperband", "median", "none")
SAMPLERS = ("random", "tpe", "gp")
EVALUATORS = ("fanova", "mdi", "ped-anova")
DEFAULT_NUM_TRIALS = 128
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_OUTAGE_S = 600.0
PROXY_PORT = 13000  # optim serve: Optuna's default port for its storage proxy
PROXY_THREADS = 8
