"""The package's one logger."""
import logging

logger = logging.getLogger("edet_deploy")
