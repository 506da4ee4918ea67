"""`tf.train.Example` as a protobuf message class without TensorFlow.

The record checker parses every record, and the TF-free input path
(`np_input`) has to run where TensorFlow is not installed (Colab's TPU
runtimes). The message is tiny; its descriptor is built here from the field
numbers of tensorflow/core/example/{example,feature}.proto, so the wire format
is TensorFlow's: tests/test_np_input.py parses the same records with both.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="trainer/example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name, *fields, nested=()):
        m = f.message_type.add(name=name)
        m.nested_type.extend(nested)
        for number, field_name, label, kind, type_name, oneof in fields:
            field = m.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = type_name
            if oneof is not None:
                field.oneof_index = oneof
        return m

    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    msg = _F.TYPE_MESSAGE
    message("BytesList", (1, "value", rep, _F.TYPE_BYTES, None, None))
    packed = [
        message("FloatList", (1, "value", rep, _F.TYPE_FLOAT, None, None)),
        message("Int64List", (1, "value", rep, _F.TYPE_INT64, None, None)),
    ]
    for m in packed:
        m.field[0].options.packed = True
    feature = message(
        "Feature",
        (1, "bytes_list", opt, msg, ".tensorflow.BytesList", 0),
        (2, "float_list", opt, msg, ".tensorflow.FloatList", 0),
        (3, "int64_list", opt, msg, ".tensorflow.Int64List", 0),
    )
    feature.oneof_decl.add(name="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=opt, type=_F.TYPE_STRING)
    entry.field.add(
        name="value", number=2, label=opt, type=msg, type_name=".tensorflow.Feature"
    )
    message(
        "Features",
        (1, "feature", rep, msg, ".tensorflow.Features.FeatureEntry", None),
        nested=[entry],
    )
    message("Example", (1, "features", opt, msg, ".tensorflow.Features", None))
    return f


# A pool of our own: TensorFlow's example_pb2, when imported, registers the
# same message names in the default pool.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())

Example = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.Example")
)
