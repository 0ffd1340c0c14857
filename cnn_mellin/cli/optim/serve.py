"""``optim serve``: Optuna's gRPC storage proxy in front of the database."""

from __future__ import annotations

from cnn_mellin.cli.optim.common import integer, quiet_optuna


def register_serve(actions) -> None:
    """``serve``: the storage proxy's options."""
    from cnn_mellin.optim.defaults import PROXY_PORT, PROXY_THREADS

    serve = actions.add_parser(
        "serve", help="run Optuna's gRPC storage proxy in front of DB_URL (for 100+ workers)",
        description="Run Optuna's gRPC storage proxy for the PostgreSQL or MySQL/MariaDB "
        "database DB_URL until SIGTERM or Ctrl-C: workers and every other optim command "
        "then use grpc://HOST:PORT as their DB_URL, and only the proxy connects to the "
        "database (at most --threads connections). The database and Optuna's tables are "
        "created if missing. No authentication: whoever reaches the port can read and write "
        "the studies.",
    )
    serve.add_argument("--host", default="localhost",
                       help="address to listen on (default localhost; 0.0.0.0 for workers "
                       "on other machines)")
    serve.add_argument("--port", type=integer, default=PROXY_PORT,
                       help=f"port to listen on (default {PROXY_PORT}; 0: any free port, "
                       "see --address-file)")
    serve.add_argument("--threads", type=integer, default=PROXY_THREADS, metavar="N",
                       help=f"threads serving calls, each with at most one database "
                       f"connection (default {PROXY_THREADS})")
    serve.add_argument("--address-file", default=None, metavar="FILE",
                       help="write grpc://HOST:PORT there once listening (removed on exit): "
                       "how worker jobs find the proxy job")
    serve.set_defaults(func=run_serve, needs_device=False)


def run_serve(args, config) -> int:
    """``serve``: run the storage proxy until stopped."""
    from cnn_mellin.optim.serve import serve

    quiet_optuna(args)
    return serve(args.db_url, host=args.host, port=args.port, threads=args.threads,
                 address_file=args.address_file)
