"""``cnnkit serve``: an interactive explorer of a trained run's CNN, in the browser.

After CNN Explainer (Wang, Turko, Shaikh, Park, Das, Hohman, Kahng and Chau 2020,
"CNN Explainer: Learning Convolutional Neural Networks with Interactive Visualization",
IEEE TVCG), for any cnnkit run (classification, segmentation, regression, super-resolution;
1D, 2D or 3D inputs, a volume shown one slice at a time with a slider) instead of one fixed
Tiny VGG: every layer's activation maps, the arithmetic of any neuron with the model's real
numbers, filters, explanation heat maps and model facts. Importing this package imports
Starlette; the ``web`` extra installs it (``pip install -e ".[web]"`` from a clone).

Example:
    >>> import json
    >>> import urllib.request
    >>> import cnnkit
    >>> from cnnkit.web import create_app, load_explorer, running
    >>> trained = cnnkit.train(data="digits", model="tinyvgg", epochs=1, progress=False)
    >>> app = create_app(load_explorer(trained.path))  # what `cnnkit serve RUN` serves
    >>> with running(app) as url:  # on a free local port, for the block
    ...     model = json.load(urllib.request.urlopen(url + "api/model"))
    >>> model["run"], model["input_size"], model["cam_layer"], len(model["classes"])
    ('tinyvgg-digits', [1, 8, 8], 'features.relu_2_2', 10)
"""

from .app import create_app, load_explorer, running, serve
from .explorer import Explorer
from .protocol import ServerLimits

__all__ = ["Explorer", "ServerLimits", "create_app", "load_explorer", "running", "serve"]
