"""`python -m fastgicn.models`: parameters and GMACs of each registered model beside the paper's figures."""
from .summary import format_summary

if __name__ == "__main__":
    print(format_summary())
