"""An LSTM sequence model: (B, T, F) -> LSTM -> last step -> Linear -> (B, outputs)."""
from torch import nn


class LSTMRegressor(nn.Module):
    def __init__(self, num_classes=1, input_shape=(32, 1), hidden_size=64, num_layers=1, dropout=0.0,
                 bidirectional=False):
        super().__init__()
        self.lstm = nn.LSTM(input_shape[-1], hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x):                  # x: (B, T, F)
        out, _ = self.lstm(x)              # (B, T, H)
        return self.head(out[:, -1])       # (B, outputs)
