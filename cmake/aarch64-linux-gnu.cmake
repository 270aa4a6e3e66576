# Cross-compiling for 64-bit ARM (Debian's multiarch packages), e.g.:
#   sudo dpkg --add-architecture arm64 && sudo apt-get update
#   sudo apt-get install crossbuild-essential-arm64 qemu-user libhwy-dev:arm64 libpcre2-dev:arm64 \
#     libutf8proc-dev:arm64 libopenblas-dev:arm64 zlib1g-dev:arm64 libcpp-httplib-dev:arm64 \
#     libgtest-dev:arm64 libgmock-dev:arm64
#   cmake -S . -B build-arm64 -G Ninja -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#     -DVISIKV_BUILD_BENCH=OFF -DVISIKV_CUDA=OFF
#   ninja -C build-arm64 && (cd build-arm64 && ctest)   # the tests run under qemu-aarch64
# Tests that start the `visikv` program as a child process also need qemu registered with the
# kernel's binfmt_misc (Debian's qemu-user-binfmt); the real-model tests take minutes each there.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Libraries and headers of the arm64 packages; programs (pkg-config's data aside) from the host.
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
# Never the host's (x86-64) libraries or their package files.
set(CMAKE_IGNORE_PATH /usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/cmake)
set(CMAKE_IGNORE_PREFIX_PATH /usr/lib/x86_64-linux-gnu)
set(ENV{PKG_CONFIG_LIBDIR} /usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig)
# Tests run under qemu's user mode, where threads waiting on each other crawl: OpenBLAS's thread
# pool never finished starting (every test binary that links it hung before main) and a tiny
# model's prefill with two OpenMP threads ran for minutes instead of 0.3 s. Under emulation they
# run with one thread of each (the threaded paths are tested on the build machine).
set(CMAKE_CROSSCOMPILING_EMULATOR
    env;OPENBLAS_NUM_THREADS=1;OMP_NUM_THREADS=1;qemu-aarch64;-L;/usr/aarch64-linux-gnu)
