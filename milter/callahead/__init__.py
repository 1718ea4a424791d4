"""callahead: a recipient-verification milter for Postfix backup MX servers."""

__version__ = "0.2.0"
