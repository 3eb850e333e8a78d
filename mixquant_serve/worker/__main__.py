"""`python -m mixquant_serve.worker`: one engine process serving routers over ZMQ (colocated mode)."""

from mixquant_serve.worker.args import main

main()
