"""A request's bytes as its message, or an InputError (INVALID_ARGUMENT) naming what is wrong.

rpc/door.py hands every servicer its requests through `decode`, so malformed input never reaches
one, whatever the method: bytes that do not parse as the method's message (the field with text
that is not UTF-8 named when there is one), and text fields holding a NUL character (no name, path,
filter or query text here may: the OS would refuse such a path deep inside a servicer).
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ..errors import InputError


def decode(raw: bytes, deserializer: Callable[[bytes], Message] | None):
    """The message `deserializer` (a message class's FromString) makes of `raw`, checked; `raw`
    itself without one."""
    if deserializer is None:
        return raw
    try:
        message = deserializer(raw)
    except Exception:  # protobuf's DecodeError, or any other refusal of the bytes
        raise _malformed(raw, getattr(deserializer, "__self__", None)) from None
    if isinstance(message, Message):
        _check_text(message, "")
    return message


def _malformed(raw: bytes, message_type) -> InputError:
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    field = _field_with_bad_text(raw, descriptor) if descriptor is not None else None
    if field:
        return InputError(f"{field} is not UTF-8 text: send text fields as UTF-8", field=field)
    name = descriptor.full_name if descriptor is not None else "the method's"
    return InputError(f"the request is not a valid {name} message (its bytes do not parse): build it from its .proto")


def _check_text(message: Message, prefix: str) -> None:
    """InputError naming the first text field (at any depth) that holds a NUL character."""
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                _check_string(key, name)
                if isinstance(item, Message):
                    _check_text(item, name + ".")
                else:
                    _check_string(item, name)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if _repeated(field) else [value]:
                _check_text(item, name + ".")
        elif field.type == FieldDescriptor.TYPE_STRING:
            for item in value if _repeated(field) else [value]:
                _check_string(item, name)


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _check_string(value, field: str) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise InputError(f"{field} holds a NUL character, which no text field may: remove it", field=field)


def _field_with_bad_text(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The (dotted) name of a string field whose bytes are not UTF-8, found by walking the wire
    format; None if there is none or the bytes are damaged otherwise."""
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 5:
                position += 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                value, position = data[position : position + length], position + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = prefix + field.name
                if field.type == FieldDescriptor.TYPE_STRING:
                    value.decode("utf-8")  # raises: this field
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = _field_with_bad_text(value, field.message_type, name + ".")
                    if inner:
                        return inner
            else:
                return None  # groups or garbage: no field to name
    except UnicodeDecodeError:
        return name
    except IndexError:
        return None
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
