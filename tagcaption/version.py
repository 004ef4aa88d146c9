"""The program's name and version, as shown by `--version` and sent as Danbooru's User-Agent."""
NAME = "tagcaption"
VERSION = "0.1.0"
USER_AGENT = f"{NAME}/{VERSION} (batch image captioner)"
