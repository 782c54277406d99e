"""Data-free inputs on which a compressed model is compared with its original: the fidelity
guard's (every compress with verification, :mod:`onnx_udfc.outputs`) and the method
selection's (``--select-method``, :mod:`onnx_udfc.methods.select`, with another seed so that
the guard stays an independent check)."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_udfc.core.io import graph_inputs
from onnx_udfc.moments.input_range import InputRange

GUARD_BATCH = 32  # data-free comparison images


def guard_feeds(model: onnx.ModelProto, input_shapes: dict[str, list[int]],
                seed: int = 0, input_range: InputRange | None = None
                ) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Data-free inputs for the guard, by kind: :data:`GUARD_BATCH` samples of the model's
    input shape, the run's working shapes (:mod:`onnx_udfc.core.input_shapes`) for dynamic
    sizes (run in the model's own batch when it fixes one). ``synthetic``: pink-noise images
    (natural images' spectrum) or Gaussian vectors; they catch a classifier's lost decisions.
    ``photos``, for a model with an image input: crops of the built-in photographs
    (:mod:`onnx_udfc.moments.proxy`); they catch a dense output's collapsed channel (a
    detector's objectness), which noise hides. Images take the values of ``input_range``
    (:mod:`onnx_udfc.moments.input_range`; standardised when None)."""
    from onnx_udfc.moments import proxy
    from onnx_udfc.moments.feeds import fixed_inputs, fixed_value
    from onnx_udfc.moments.sampled import in_range, pink_noise

    rng = np.random.default_rng(seed)
    fixed = fixed_inputs(model)
    mean, std = (input_range.mean, input_range.std) if input_range is not None else (0.0, 1.0)
    feed = {}
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        dims = list(input_shapes.get(inp.name) or [
            d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim])
        if inp.name in fixed:
            feed[inp.name] = fixed_value([d or 1 for d in dims], tt.elem_type, rng)
            continue
        if dims and (dims[0] == 0 or GUARD_BATCH % dims[0] == 0):
            dims[0] = GUARD_BATCH  # a fixed batch runs in chunks of its own size
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        image = len(dims) >= 3 and min(dims[2:]) >= 4
        x = in_range(pink_noise(tuple(dims), rng), mean, std) if image \
            else rng.standard_normal(dims)
        feed[inp.name] = x.astype(dtype)
    kinds = [("synthetic", feed)]
    images = proxy.image_inputs(model, input_shapes)
    if images:
        photos = dict(feed)
        for name, dims in images.items():
            x = proxy.standardise(proxy.proxy_batch(len(feed[name]), *dims[1:], rng), mean, std)
            photos[name] = x.astype(feed[name].dtype)
        kinds.append(("photos", photos))
    return kinds
