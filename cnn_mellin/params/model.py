"""The ``model`` group: the acoustic model's architecture (docs/architecture.md, "The Mellin
correlation").

Window sizes are in frames for filterbank-like features and in samples for raw
audio (one coefficient per frame), so each has its own pair of parameters and
only the pair that fits the data is active. Convolutional layers whose 1-based
index is a multiple of ``convolutional_factor_sched`` shrink the window time axis
by ``convolutional_time_factor``, the frequency axis by
``convolutional_freq_factor`` and multiply the channels by
``convolutional_channel_factor``.
"""

from cnn_mellin.config import Group, Param, Search


def _features(values, num_coeffs):
    return num_coeffs > 1


def _raw(values, num_coeffs):
    return num_coeffs == 1


def _conv(values, num_coeffs):
    return values["model.convolutional_layers"] > 0


def _conv_freq(values, num_coeffs):
    return num_coeffs > 1 and values["model.convolutional_layers"] > 0


def _factors(values, num_coeffs):
    return 0 < values["model.convolutional_factor_sched"] <= values["model.convolutional_layers"]


def _freq_factor(values, num_coeffs):
    return num_coeffs > 1 and _factors(values, num_coeffs)


def _conv_dropout(values, num_coeffs):
    return values["model.convolutional_layers"] > 0 and values["model.dropout"] > 0


def _recurrent(values, num_coeffs):
    return values["model.recurrent_layers"] > 0


GROUP = Group(
    "model",
    "Acoustic model: windows -> correlation stack -> sum over window -> recurrent stack -> "
    "linear -> CTC.",
    [
        Param(
            "window_size", int, 8, "Frames per window, the window image's time axis (features).",
            low=1, high=10000, search=Search(3, 20), active=_features,
        ),
        Param(
            "window_stride", int, 2, "Frames between the starts of successive windows (features); "
            "the model emits one output per window, so this sets the CTC frame rate.",
            low=1, high=10000, search=Search(1, 4), active=_features,
        ),
        Param(
            "raw_window_size", int, 400, "Samples per window for raw audio (400 is 25 ms at "
            "16 kHz).", low=1, high=1000000, search=Search(160, 1600, log=True), active=_raw,
        ),
        Param(
            "raw_window_stride", int, 320, "Samples between successive windows for raw audio "
            "(320 is 20 ms at 16 kHz).", low=1, high=1000000, search=Search(80, 480, log=True),
            active=_raw,
        ),
        Param(
            "convolutional_layers", int, 2, "Correlation layers run over each window.",
            low=0, high=64, search=Search(0, 6),
        ),
        Param(
            "convolutional_mellin", bool, False, "Mellin (true) or linear (false) correlation "
            "along the window's time axis; frequency is always linear.",
            search=Search(choices=(False, True)), active=_conv,
        ),
        Param(
            "convolutional_kernel_time", int, 3, "Kernel taps along the window's time axis.",
            low=1, high=256, search=Search(1, 7), active=_conv,
        ),
        Param(
            "convolutional_kernel_freq", int, 3, "Kernel taps along frequency.",
            low=1, high=256, search=Search(1, 9), active=_conv_freq,
        ),
        Param(
            "convolutional_initial_channels", int, 16, "Output channels of the first layer.",
            low=1, high=4096, search=Search(4, 128, log=True), active=_conv,
        ),
        Param(
            "convolutional_factor_sched", int, 1, "Every this many layers (by 1-based index) a "
            "layer shrinks time and frequency and grows channels by the factors below; larger "
            "than convolutional_layers means never.",
            low=1, high=65, search=Search(1, 4), active=_conv,
        ),
        Param(
            "convolutional_time_factor", int, 2, "Time-axis shrink factor of scheduled layers "
            "(output size is the ceiling of input size over this).",
            low=1, high=64, search=Search(1, 3), active=_factors,
        ),
        Param(
            "convolutional_freq_factor", int, 2, "Frequency-axis shrink factor of scheduled "
            "layers.", low=1, high=64, search=Search(1, 3), active=_freq_factor,
        ),
        Param(
            "convolutional_channel_factor", int, 2, "Channel growth factor of scheduled layers.",
            low=1, high=16, search=Search(1, 2), active=_factors,
        ),
        Param(
            "convolutional_nonlinearity", str, "relu", "Pointwise function after each "
            "correlation layer.", choices=("relu", "gelu", "tanh", "sigmoid"),
            search=Search(choices=("relu", "gelu", "tanh", "sigmoid")), active=_conv,
        ),
        Param(
            "convolutional_dropout_2d", bool, False, "Drop whole channels (true) rather than "
            "single values (false) after correlation layers.",
            search=Search(choices=(False, True)), active=_conv_dropout,
        ),
        Param(
            "recurrent_layers", int, 2, "Recurrent layers over the sequence of windows.",
            low=0, high=32, search=Search(0, 4),
        ),
        Param(
            "recurrent_size", int, 160, "Hidden units per recurrent layer and direction.",
            low=1, high=8192, search=Search(32, 512, log=True), active=_recurrent,
        ),
        Param(
            "recurrent_type", str, "lstm", "Recurrent cell.", choices=("lstm", "gru", "rnn"),
            search=Search(choices=("lstm", "gru", "rnn")), active=_recurrent,
        ),
        Param(
            "recurrent_bidirectional", bool, True, "Run each recurrent layer in both "
            "directions.", search=Search(choices=(False, True)), active=_recurrent,
        ),
        Param(
            "dropout", float, 0.0, "Dropout probability after correlation layers, between "
            "recurrent layers and before the output layer.",
            low=0.0, high=0.9, search=Search(0.0, 0.5),
        ),
        Param(
            "input_dropout", float, 0.0, "Dropout probability of single values of the "
            "normalised input frames.",
            low=0.0, high=0.9, search=Search(0.0, 0.3),
        ),
        Param(
            "input_smoothing_width", float, 0.0, "Standard deviation of a Gaussian smoothing "
            "of the normalised input along time, in frames (samples for raw audio), in "
            "training and decoding alike; 0 for none.",
            low=0.0, high=100.0, search=Search(0.0, 3.0),
        ),
        Param(
            "layer_norm", bool, False, "Layer normalisation of the input of every recurrent "
            "layer (before the recurrent stack and between its layers).",
            search=Search(choices=(False, True)), active=_recurrent,
        ),
    ],
)
