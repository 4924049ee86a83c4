"""Plain ``nn.Module`` builders: no Lightning, no file layout knowledge beyond weight files."""
