"""Numbers in explanations: compared times tell apart, small rates get a smaller unit."""
from plait.planner.wording import device_word, flops_rate, percent, seconds, seconds_pair


def test_compared_times_get_the_digits_that_tell_them_apart():
    assert seconds_pair(4.0512, 4.0534) == ("4.051", "4.053")  # was "4.05 s vs 4.05 s"
    assert seconds_pair(4.05001, 4.05002) == ("4.05001", "4.05002")
    assert seconds_pair(2.0, 2.0) == ("2.00", "2.00")
    assert seconds(4.0512) == "4.05" and seconds(0.0500) == "0.0500"


def test_rates_below_a_tflop_use_a_smaller_unit():
    assert flops_rate(412.3e12) == "412 TFLOP/s" and flops_rate(1.234e12) == "1.23 TFLOP/s"
    assert flops_rate(25.7e9) == "25.7 GFLOP/s"  # was "0 TFLOP/s"
    assert percent(0.2) == "+0.2%" and percent(0.04) == "+0.04%" and percent(-7.31) == "-7.3%"
    assert device_word("nccl") == "GPU" and device_word("gloo") == "device"
