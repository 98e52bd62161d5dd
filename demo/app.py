"""nograd demo. Until the Gradio demo lands, this prints every method nograd can attach and what it takes."""

import nograd


def main() -> None:
    for name, info in nograd.methods().items():
        print(f"{name}: {info.summary}")
        print(f"  paper: {info.paper} (arXiv {info.arxiv})")
        print(f"  families: {', '.join(info.families)}")
        for option, meta in info.options.items():
            print(f"  {option}={meta['default']!r}: {meta['doc']}")


if __name__ == "__main__":
    main()
