"""`corral probe`: placeholder while the suite lands."""


def add_parser(sub):
    p = sub.add_parser("probe", help="audit a backend with the conformance probe suite")
    return p


def main(args):
    return 2
