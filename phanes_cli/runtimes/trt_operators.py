"""What TensorRT's ONNX parser accepts, as data, and the check that an exported graph stays inside it.

Source: the operator support matrix of the ONNX-TensorRT parser, onnx/onnx-tensorrt `docs/operators.md`
at commit 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc ("TensorRT 8.5 supports operators up to Opset 17").
Only the operators marked supported are listed, with the restrictions that concern our graphs. Newer
TensorRT releases accept a superset, so a graph that passes here parses on 8.5 and later.
"""

from __future__ import annotations

import onnx

SOURCE = "onnx/onnx-tensorrt docs/operators.md @ 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc (TensorRT 8.5)"
MAX_OPSET = 17

SUPPORTED_OPS: frozenset[str] = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GRU",
    "HardSwish", "HardSigmoid", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max",
    "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero",
    "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh",
    "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})

# Resize restrictions of the same table.
RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                     "align_corners"})
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})
POOL_CONV_OPS = frozenset({"Conv", "ConvTranspose", "AveragePool", "MaxPool"})  # "2D or 3D only"


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_problem(node: onnx.NodeProto, ranks: dict[str, int]) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return f"{node.op_type} from custom domain {node.domain!r}"
    if node.op_type not in SUPPORTED_OPS:
        return f"{node.op_type} is not supported"
    if node.op_type == "Resize":
        mode, coord = _attr(node, "mode", "nearest"), _attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        bad_nearest = mode == "nearest" and nearest not in RESIZE_NEAREST_MODES
        if mode not in RESIZE_MODES or coord not in RESIZE_COORDINATE_MODES or bad_nearest:
            return f"Resize with mode={mode}, coordinate_transformation_mode={coord}, nearest_mode={nearest}"
    if node.op_type in POOL_CONV_OPS and ranks.get(node.input[0], 4) not in (4, 5):
        return f"{node.op_type} on a rank-{ranks[node.input[0]]} tensor (2D or 3D only)"
    return None


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """Every node (and the opset) TensorRT's ONNX parser would reject, as readable lines; empty when it parses."""
    problems = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > MAX_OPSET:
        problems.append(f"opset {opset} is newer than {MAX_OPSET}")
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if v.type.tensor_type.HasField("shape")}
    for node in model.graph.node:
        problem = _node_problem(node, ranks)
        if problem is not None:
            problems.append(f"node {node.name or node.op_type}: {problem}")
    return problems
