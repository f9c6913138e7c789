#!/bin/sh
# The plugin SDK as an outside author meets it.
#
# Installs the current tree into a temporary prefix, then, using ONLY what
# was installed (headers, pkg-config file, program, plugin directory, and
# the SDK in $(docdir)/sdk):
#   - checks that LICENSE and the SDK are installed, that `pkg-config
#     --variable=sdkdir peftref-plugin` names the installed SDK, and that
#     the installed GUIDE.md points at no file of a source checkout;
#   - builds the installed template (a copy of $(docdir)/sdk/template) with
#     `pkg-config --cflags peftref-plugin` (no -I into the source tree) and
#     installs it into a search-path directory;
#   - finds it with `peftref plugins` through PEFTREF_PLUGIN_PATH, next to
#     the installed built-in lora;
#   - runs the conformance checker `peftref plugins check` on it and on lora;
#   - trains it in a pipeline (`peftref train PIPELINE.yaml`);
#   - when Autotools are available, builds and installs the installed
#     template pack (a copy of $(docdir)/sdk/template-pack) the same way
#     and finds its two techniques;
#   - checks that nothing was written into the installed SDK.
#
# Usage: tests/sdk_outoftree.sh [-j N]
#   PEFTREF_SDK_KEEP=1   keep the temporary directory even on success
#   PEFTREF_SDK_PREFIX=DIR  use an existing installed prefix (skip the
#                           configure/make install of the tree)
# Prints one line per step and a final "N passed, N failed"; exits non-zero
# on any failure.  Logs of a failed step are shown in part and kept.
set -u

JOBS=2
while [ $# -gt 0 ]; do
    case "$1" in
    -j) JOBS=$2; shift 2 ;;
    -j*) JOBS=${1#-j}; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "sdk_outoftree.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/peftref-sdk.XXXXXX") || exit 1
LOGS=$TMP/logs
mkdir -p "$LOGS"
PREFIX=${PEFTREF_SDK_PREFIX:-$TMP/prefix}
BIN=$PREFIX/bin/peftref
DOCDIR=$PREFIX/share/doc/peftref

# Nothing from the caller's environment may point the compiler or the
# loader at the source tree or another peftref.
unset CPATH C_INCLUDE_PATH LIBRARY_PATH PEFTREF_PLUGIN_PATH
PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig
export PKG_CONFIG_PATH
PKG_CONFIG=${PKG_CONFIG:-pkg-config}

passed=0
failed=0
failed_names=""

# step NAME COMMAND...: run COMMAND with output to $LOGS/NAME.log.
step() {
    name=$1
    shift
    # a subshell, so that a step's cd or variables do not leak
    if ("$@") >"$LOGS/$name.log" 2>&1; then
        passed=$((passed + 1))
        echo "PASS  $name"
    else
        failed=$((failed + 1))
        failed_names="$failed_names $name"
        echo "FAIL  $name (log: $LOGS/$name.log)"
        tail -n 15 "$LOGS/$name.log" | sed 's/^/      | /'
    fi
}

# skip_step NAME REASON: a step that cannot run because an earlier one failed.
skip_step() {
    failed=$((failed + 1))
    failed_names="$failed_names $1"
    echo "FAIL  $1 (not run: $2)"
}

finish() {
    echo "$passed passed, $failed failed"
    if [ "$failed" -eq 0 ] && [ -z "${PEFTREF_SDK_KEEP:-}" ]; then
        chmod -R u+w "$TMP" 2>/dev/null   # the installed SDK was made read-only
        rm -rf "$TMP"
    else
        echo "kept $TMP"
    fi
    [ "$failed" -eq 0 ]
    exit $?
}

# ---- 1. install the tree into the temporary prefix --------------------------------
install_tree() {
    mkdir -p "$TMP/build" && cd "$TMP/build" &&
        "$SRC/configure" -q --prefix="$PREFIX" &&
        make -j"$JOBS" &&
        make install
}
if [ -n "${PEFTREF_SDK_PREFIX:-}" ]; then
    echo "using installed prefix $PREFIX"
else
    step install install_tree
fi

installed() {
    for f in "$PREFIX/include/peftref/plugin.h" "$PREFIX/include/peftref/site.h" \
             "$PREFIX/include/peftref/ext/embed_tokens.h" \
             "$PREFIX/lib/pkgconfig/peftref-plugin.pc" "$BIN" \
             "$DOCDIR/LICENSE" "$DOCDIR/sdk/GUIDE.md" "$DOCDIR/sdk/manifest.example.json" \
             "$DOCDIR/sdk/template/Makefile" "$DOCDIR/sdk/template/scaled_bias.c" \
             "$DOCDIR/sdk/example/Makefile" "$DOCDIR/sdk/example/frozen_a_lora.c" \
             "$DOCDIR/sdk/template-pack/configure.ac" "$DOCDIR/sdk/template-pack/Makefile.am" \
             "$DOCDIR/sdk/template-pack/manifest.json"; do
        [ -f "$f" ] || { echo "missing $f"; return 1; }
    done
}
step installed-files installed
if [ "$failed" -ne 0 ]; then
    skip_step everything-else "the tree did not install"
    finish
fi

# ---- 2. the pkg-config file -----------------------------------------------------
PLUGINDIR=$($PKG_CONFIG --variable=plugindir peftref-plugin)
pkgconfig_file() {
    cflags=$($PKG_CONFIG --cflags peftref-plugin) || return 1
    libs=$($PKG_CONFIG --libs peftref-plugin) || return 1
    echo "cflags='$cflags' libs='$libs' plugindir='$PLUGINDIR'"
    # Cflags point into the prefix (pkg-config may omit a system path)
    case "$cflags" in ""|*"-I$PREFIX/include"*) ;; *) echo "Cflags not in the prefix"; return 1 ;; esac
    # no Libs: plugins link against nothing of peftref
    [ -z "$(echo "$libs" | tr -d ' ')" ] || { echo "unexpected Libs"; return 1; }
    [ "$PLUGINDIR" = "$PREFIX/lib/peftref/plugins" ] || { echo "plugindir not in the prefix"; return 1; }
    [ -f "$PLUGINDIR/lora.so" ] || { echo "lora.so is not installed in plugindir"; return 1; }
}
step pkg-config pkgconfig_file

# ---- 2b. the installed SDK: where pkg-config says, with a guide to installed files --
SDKDIR=$($PKG_CONFIG --variable=sdkdir peftref-plugin)
sdkdir_variable() {
    echo "sdkdir='$SDKDIR'"
    [ "$SDKDIR" = "$DOCDIR/sdk" ] || { echo "sdkdir is not \$(docdir)/sdk of the prefix"; return 1; }
    [ -f "$SDKDIR/GUIDE.md" ] && [ -d "$SDKDIR/template" ] && [ -d "$SDKDIR/template-pack" ] ||
        { echo "sdkdir does not hold the guide and the templates"; return 1; }
}
step sdkdir sdkdir_variable

# The guide is read from the installed copy: any path into a source checkout
# (plugins/lora.c, core/, sdk/template/, ...; not a path inside the prefix
# such as $(libdir)/peftref/plugins/) would name a file the reader lacks.
installed_guide() {
    guide=$DOCDIR/sdk/GUIDE.md
    [ -s "$guide" ] || { echo "no $guide"; return 1; }
    if grep -n -E '(^|[^/[:alnum:]_.$)-])(core|plugins|sdk|include|tests|docs|examples|man|scripts|bench)/' "$guide"; then
        echo "the installed guide points into a source checkout"
        return 1
    fi
    if grep -n -F -e "plugins/lora.c" -e "$SRC" "$guide"; then
        echo "the installed guide names a source file"
        return 1
    fi
    # it points at the installed templates and header instead
    grep -q 'share/doc/peftref/sdk/template/' "$guide" &&
        grep -q 'include/peftref/plugin.h' "$guide" ||
        { echo "the guide does not name the installed templates and header"; return 1; }
}
step installed-guide installed_guide

# Templates are built from copies: the installed SDK may be read-only (it is
# made so here when this test installed it), and must stay as installed.
sdk_listing() { (cd "$SDKDIR" && find . -print | LC_ALL=C sort); }
if [ -d "$SDKDIR" ]; then
    sdk_listing >"$TMP/sdk-before.lst"
    [ -n "${PEFTREF_SDK_PREFIX:-}" ] || chmod -R a-w "$SDKDIR"
fi
# copy_sdk NAME DEST: a writable copy of the installed $SDKDIR/NAME
copy_sdk() {
    [ -d "$SDKDIR/$1" ] || { echo "no installed $SDKDIR/$1"; return 1; }
    cp -R "$SDKDIR/$1" "$2" && chmod -R u+w "$2"
}

# ---- 3. build the template against the installed SDK only ------------------------
TPL=$TMP/template
build_template() {
    copy_sdk template "$TPL" && cd "$TPL" && make clean >/dev/null || return 1
    make CFLAGS="-O2 -g -Werror" PEFTREF="$BIN" >"$LOGS/template-make.out" 2>&1
    rc=$?
    cat "$LOGS/template-make.out"
    [ "$rc" -eq 0 ] || return 1
    # the compile line must not reach into the source tree
    if grep -F -- "$SRC" "$LOGS/template-make.out"; then
        echo "the build used the source tree"
        return 1
    fi
    [ -f scaled_bias.so ] || return 1
    # one exported symbol, and no dependency on libpeftref
    if command -v nm >/dev/null 2>&1; then
        syms=$(nm -D --defined-only scaled_bias.so | awk '$2 == "T" { print $3 }')
        echo "exported: $syms"
        [ "$syms" = "peftref_plugin_entry" ] || return 1
    fi
    if command -v ldd >/dev/null 2>&1 && ldd scaled_bias.so | grep -q peftref; then
        echo "scaled_bias.so links against peftref"
        return 1
    fi
}
step template-build build_template

install_template() {
    mkdir -p "$TMP/search" && cd "$TPL" &&
        make install PLUGINDIR="$TMP/search" &&
        [ -f "$TMP/search/scaled_bias.so" ]
}
if [ -f "$TPL/scaled_bias.so" ]; then
    step template-install install_template
else
    skip_step template-install "the template did not build"
fi

# ---- 4. discovery through PEFTREF_PLUGIN_PATH ------------------------------------
list_plugins() {
    out=$(PEFTREF_PLUGIN_PATH="$TMP/search" "$BIN" plugins 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] || return 1
    echo "$out" | grep -q "scaled_bias" || { echo "scaled_bias not listed"; return 1; }
    echo "$out" | grep -q "$TMP/search/scaled_bias.so" || { echo "its origin is not shown"; return 1; }
    echo "$out" | grep -q "lora" || { echo "the installed lora is not listed"; return 1; }
    # none of this test's files refused
    if echo "$out" | sed -n '/^refused:/,$p' | grep -F -q "$TMP"; then
        echo "a file of this test was refused"
        return 1
    fi
}
inspect_plugin() {
    out=$(PEFTREF_PLUGIN_PATH="$TMP/search" "$BIN" plugins inspect scaled_bias 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] && echo "$out" | grep -q "alpha" && echo "$out" | grep -qi "scaled addition"
}
if [ -f "$TMP/search/scaled_bias.so" ]; then
    step plugins-list list_plugins
    step plugins-inspect inspect_plugin
else
    skip_step plugins-list "the template is not installed"
    skip_step plugins-inspect "the template is not installed"
fi

# ---- 5. the conformance checker ------------------------------------------------
if [ -f "$TMP/search/scaled_bias.so" ]; then
    step check-template "$BIN" plugins check "$TMP/search/scaled_bias.so"
else
    skip_step check-template "the template is not installed"
fi
step check-lora "$BIN" plugins check "$PLUGINDIR/lora.so"

# ---- 5b. the installed worked example builds and passes the checker ---------------
EXA=$TMP/example
build_example() {
    copy_sdk example "$EXA" && cd "$EXA" && make clean >/dev/null || return 1
    make CFLAGS="-O2 -g -Werror" PEFTREF="$BIN" >"$LOGS/example-make.out" 2>&1
    rc=$?
    cat "$LOGS/example-make.out"
    [ "$rc" -eq 0 ] && [ -f frozen_a_lora.so ] || return 1
    if grep -F -- "$SRC" "$LOGS/example-make.out"; then
        echo "the build used the source tree"
        return 1
    fi
}
step example-build build_example
if [ -f "$EXA/frozen_a_lora.so" ]; then
    step check-example "$BIN" plugins check "$EXA/frozen_a_lora.so"
else
    skip_step check-example "the example did not build"
fi

# ---- 6. train the template inside a pipeline ------------------------------------
cat >"$TMP/pipeline.yaml" <<EOF
# scaled_bias on a byte-level GPT-2 of test size (keys: docs/pipeline.md)
model:
  preset: gpt2-tiny
  seed: 1
modules:
  - technique: scaled_bias
    sites: [ffn_out]
    options:
      alpha: 2.0
task:
  type: lm
  train: $SRC/tests/data/train/corpus.txt
  val_fraction: 0.1
train:
  steps: 4
  batch: 2
  seq_len: 32
  lr: 0.01
  seed: 1
  output: $TMP/run
EOF
train_pipeline() {
    cat "$TMP/pipeline.yaml"
    PEFTREF_PLUGIN_PATH="$TMP/search" "$BIN" train "$TMP/pipeline.yaml" || return 1
    [ -s "$TMP/run/metrics.jsonl" ] || { echo "no metrics.jsonl"; return 1; }
    # optimizer steps with their loss were logged
    grep -q '"step"' "$TMP/run/metrics.jsonl" && grep -q '"loss"' "$TMP/run/metrics.jsonl" || return 1
    # every line is one JSON object (checked when python3 is at hand)
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import json, sys
for n, line in enumerate(open(sys.argv[1]), 1):
    try:
        json.loads(line)
    except ValueError as e:
        sys.exit("metrics.jsonl:%d: %s: %s" % (n, e, line.strip()))' "$TMP/run/metrics.jsonl"
    fi
}
if [ -f "$TMP/search/scaled_bias.so" ]; then
    step pipeline-train train_pipeline
else
    skip_step pipeline-train "the template is not installed"
fi

# ---- 7. the Autotools technique pack ----------------------------------------------
build_pack() {
    copy_sdk template-pack "$TMP/pack" && cd "$TMP/pack" &&
        autoreconf -fi &&
        mkdir build && cd build &&
        ../configure -q &&
        make CFLAGS="-O2 -g -Werror" &&
        make install &&
        [ -f "$PLUGINDIR/example-pack/example_pack.so" ] &&
        [ -f "$PLUGINDIR/example-pack/manifest.json" ]
}
list_pack() {
    out=$("$BIN" plugins 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] && echo "$out" | grep -q example_gain && echo "$out" | grep -q example_adapter
}
if command -v autoreconf >/dev/null 2>&1 && command -v libtoolize >/dev/null 2>&1; then
    step pack-build build_pack
    if [ -f "$PLUGINDIR/example-pack/example_pack.so" ]; then
        step pack-list list_pack
        step check-pack "$BIN" plugins check "$PLUGINDIR/example-pack/example_pack.so"
    else
        skip_step pack-list "the pack did not build"
        skip_step check-pack "the pack did not build"
    fi
else
    echo "SKIP  pack-build (autoreconf or libtoolize not installed)"
fi

# ---- 8. the installed SDK is as it was installed ---------------------------------
sdk_untouched() {
    sdk_listing >"$TMP/sdk-after.lst"
    diff "$TMP/sdk-before.lst" "$TMP/sdk-after.lst" || { echo "files appeared in the installed SDK"; return 1; }
}
if [ -f "$TMP/sdk-before.lst" ]; then
    step sdk-untouched sdk_untouched
else
    skip_step sdk-untouched "the SDK is not installed"
fi

finish
