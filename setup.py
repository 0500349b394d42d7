"""Only what pyproject.toml cannot say: the Cython extension and the kernels/ -> fastgicn.kernels mapping."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

extensions = [
    Extension(
        "fastgicn._tiler",
        ["csrc/_tiler.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    Extension(
        "fastgicn._preprocess",
        ["csrc/_preprocess.pyx"],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
    ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False,
                                                                             "wraparound": False,
                                                                             "cdivision": True}),
    packages=find_packages(include=["fastgicn", "fastgicn.*"]) + ["fastgicn.kernels"],
    package_dir={"fastgicn.kernels": "kernels"},
)
