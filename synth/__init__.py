"""synth: config-driven image synthesis on diffusers pipelines."""

import logging


class _NoTorchvisionNotice(logging.Filter):
    """synth leaves torchvision out on purpose (its PyPI wheel breaks beside the CPU torch wheel), so
    transformers' notice that it falls back to PIL image processors is noise on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
