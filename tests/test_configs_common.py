import pytest

from configs.common import parse_arg


def test_parse_arg_types_and_errors():
    out = parse_arg("variant=XL/2,res=512,runlocal=true", variant="S/2", res=256, runlocal=False)
    assert out == {"variant": "XL/2", "res": 512, "runlocal": True}
    assert parse_arg(None, res=256) == {"res": 256}
    with pytest.raises(ValueError, match="unknown config argument 'rse'"):
        parse_arg("rse=512", res=256)
    with pytest.raises(ValueError, match="key=value"):
        parse_arg("XL/2", variant="S/2")
