"""The handler's reading of a request's parts (handler/request_parsing.py), apart from decoding them."""

from request_parsing import parse_request


def test_style_and_mask_parts_are_taken_by_their_numbers_not_their_arrival_order():
    """A form's fields may arrive in any order (TorchServe hands them over as they came): style_2 before style
    must still be the second style, paired with mask_2 and style_blend's second weight; style_10 comes after
    style_9, not after style."""
    row = {"mask_2": b"m2", "style_2": b"s2", "content": b"c", "mask_1": b"m1", "style": b"s1"}
    request = parse_request(row, max_styles=4)
    assert request.styles == (b"s1", b"s2") and request.masks == (b"m1", b"m2") and request.content == b"c"
    many = {f"style_{number}": f"s{number}".encode() for number in range(10, 1, -1)} | {"style": b"s1",
                                                                                      "content": b"c"}
    assert parse_request(many, max_styles=10).styles == tuple(f"s{number}".encode() for number in range(1, 11))
