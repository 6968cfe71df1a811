"""The runs' console logger: Dagster's own by default, one JSON object per line with
VP_LOG_FORMAT=json (`telemetry.logs.JsonFormatter`: run id, job, step, collection and model
from the run's metadata and partition tags). Bound for every job in definitions.py."""

import logging
import sys

import dagster as dg

from vector_platform.telemetry import logs


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, is_required=False, default_value="INFO", description="The logger's threshold."),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
    },
    description="Run logs as JSON lines on stderr (VP_LOG_FORMAT=json), secrets masked.",
)
def json_console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    logger = logging.Logger(config["name"], level=logging.getLevelName(config["log_level"].upper()))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    return logger


def run_loggers() -> dict[str, dg.LoggerDefinition]:
    """The `console` logger every job gets; empty (Dagster's coloured one) unless JSON is asked."""
    return {"console": json_console_logger} if logs.log_format() == "json" else {}
