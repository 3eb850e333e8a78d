"""`python -m router --model-path DIR --worker-urls tcp://...`: the OpenAI-compatible HTTP router."""

from router.app import main

if __name__ == "__main__":
    main()
