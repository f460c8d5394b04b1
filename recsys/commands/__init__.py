"""One module per `recsys` command group. Each exposes `register(subparsers)`, which adds
its parser(s) and sets `handler` to a function `(args) -> exit status`. Handlers import
heavy dependencies (training code, gRPC servers) inside the function, never at module
level, so `recsys --help` stays fast and works with the `serve` extra alone."""
