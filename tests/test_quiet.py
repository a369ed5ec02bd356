"""pipeline/quiet.py: the known-harmless library messages are dropped at their loggers, nothing else is."""
import logging

import pytest
from packaging.version import Version

from pipeline import quiet


LOGGED = [n for n in quiet.NOISE if n.logger != "warnings"]
WARNED = [n for n in quiet.NOISE if n.logger == "warnings"]


@pytest.mark.parametrize("noise", WARNED, ids=[n.starts[:30] for n in WARNED])
def test_known_warnings_are_ignored_and_others_are_not(noise):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()  # on top of "always": its filters come first
        warnings.warn(noise.starts + " ... (as the library words it)", noise.category)
        warnings.warn("another warning of the same class", noise.category)
    assert [str(w.message) for w in caught] == ["another warning of the same class"]


@pytest.mark.parametrize("noise", LOGGED, ids=[f"{n.logger}:{(n.starts or '*')[:20]}" for n in LOGGED])
def test_known_noise_is_dropped_and_the_rest_of_its_logger_passes(noise, caplog):
    quiet.install()
    logger = logging.getLogger(noise.logger)
    with caplog.at_level(logging.DEBUG, logger="never-used"):  # caplog's handler sees what the loggers let through
        logger.warning((noise.starts or "anything") + " ... (as the library words it)")
        logger.warning("another warning of the same logger")
        logger.error("a real error of the same library")
    said = [r.getMessage() for r in caplog.records if r.name == noise.logger]
    # a whole-logger entry lets errors through; a message entry lets every other message through
    assert said == (["a real error of the same library"] if noise.starts is None else
                    ["another warning of the same logger", "a real error of the same library"]), said


def test_the_messages_still_read_as_the_entries_say():
    """Each message entry starts as the installed library words it (a library that rewords one makes the filter
    a no-op: this says so). Entries for messages a newer release no longer has are checked where it has them."""
    import inspect

    import transformers
    from transformers import configuration_utils, modeling_utils
    from transformers.utils import generic

    sources = {"transformers.modeling_utils": inspect.getsource(modeling_utils),
               "transformers.configuration_utils": inspect.getsource(configuration_utils),
               "transformers.utils.generic": inspect.getsource(generic)}
    try:  # optional ([openvino] extra); through the pipeline's hook, which newer transformers need to import it
        from pipeline import formats  # noqa: F401
        from optimum.intel.openvino import modeling_base

        sources["optimum.intel.openvino.modeling_base"] = inspect.getsource(modeling_base)
    except ImportError:
        pass
    renamed = Version(transformers.__version__) >= Version("5.24")
    for noise in quiet.NOISE:
        # transformers.utils.generic: the cache's old name warns from 5.24, where the models renamed it
        if noise.logger in sources and (noise.logger != "transformers.utils.generic" or renamed):
            # the source holds the text up to its first placeholder
            head = noise.starts.split("None")[0]
            assert head in sources[noise.logger], (noise.logger, noise.starts, transformers.__version__)
