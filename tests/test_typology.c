/* Tests of `peftref typology`: the program run with PEFTREF_PLUGIN_PATH at
 * the build tree's plugins, in each output format.
 *
 *  - text: a header and one aligned row per technique (each column starts
 *    at the header's offset);
 *  - markdown: every line is a table row of 12 cells, the second the
 *    separator;
 *  - csv: RFC 4180 records (quoted fields, doubled quotes, CRLF) of 12
 *    fields each, the header's keys first;
 *  - json: parses with jansson into an array of objects with every key;
 *  - in each format the ia3 and bitfit rows carry DESIGN.md §1's words for
 *    their typology, mergeability and insertion count;
 *  - a bad format is a usage error (status 2). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <jansson.h>

#define PLUGIN_PATH TEST_BUILDDIR "/plugins/.libs"
#define N_COLS 12

static const char *const keys[N_COLS] = {
    "technique", "intra_connectivity", "inter_connectivity", "parameter_adaptation", "parameter_sharing",
    "input_type", "insertion_form", "insertions", "integration_form", "workspace", "mergeable", "param_formula",
};

/* Expected cells of two rows, in keys[] order (param_formula only checked
 * for being non-empty). */
static const char *const ia3_row[N_COLS] = {
    "ia3", "none", "fixed", "rescaling", "none", "hidden-states", "sequential", "3L", "rescaling",
    "attention, ffn", "yes", NULL,
};
static const char *const bitfit_row[N_COLS] = {
    "bitfit", "none", "fixed", "selection", "none", "none", "in-place", "none", "selection",
    "attention, ffn, norm", "no", NULL,
};

/* Run the program; returns its exit status and its standard output. */
static int run(const char *args, char **out)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s' '%s' %s 2>/dev/null", PLUGIN_PATH, PEFTREF_BIN, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += got;
        if (cap - n < 2) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    buf[n] = '\0';
    int st = pclose(p);
    *out = buf;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ---- CSV (RFC 4180) ------------------------------------------------------------ */

typedef struct csv_record {
    int n;
    char *field[32];
} csv_record;

/* Parse one record at *p; returns 0 at the end of input, -1 on a
 * malformed record.  Records end in CRLF. */
static int csv_next(const char **p, csv_record *r)
{
    const char *s = *p;
    if (!*s)
        return 0;
    r->n = 0;
    for (;;) {
        char buf[2048];
        size_t k = 0;
        if (*s == '"') {
            s++;
            for (;;) {
                if (!*s)
                    return -1;
                if (*s == '"') {
                    if (s[1] == '"') {
                        buf[k++] = '"';
                        s += 2;
                        continue;
                    }
                    s++;
                    break;
                }
                buf[k++] = *s++;
            }
        } else {
            while (*s && *s != ',' && *s != '\r' && *s != '\n') {
                if (*s == '"')
                    return -1;   /* a quote inside an unquoted field */
                buf[k++] = *s++;
            }
        }
        buf[k] = '\0';
        if (r->n >= 32)
            return -1;
        r->field[r->n++] = strdup(buf);
        if (*s == ',') {
            s++;
            continue;
        }
        if (s[0] == '\r' && s[1] == '\n') {
            *p = s + 2;
            return 1;
        }
        return -1;   /* bare LF, or end of input without CRLF */
    }
}

static void csv_free(csv_record *r)
{
    for (int i = 0; i < r->n; i++)
        free(r->field[i]);
    r->n = 0;
}

static void check_row(const char *const *cells, const char *const *want)
{
    for (int c = 0; c < N_COLS; c++) {
        if (!want[c]) {
            assert_true(cells[c][0] != '\0');
            continue;
        }
        if (strcmp(cells[c], want[c]) != 0)
            fprintf(stderr, "%s: column %s is '%s', expected '%s'\n", want[0], keys[c], cells[c], want[c]);
        assert_string_equal(cells[c], want[c]);
    }
}

static void test_csv(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run("typology --format csv", &out), 0);
    const char *p = out;
    csv_record r;
    int records = 0, seen_ia3 = 0, seen_bitfit = 0, rc;
    while ((rc = csv_next(&p, &r)) == 1) {
        assert_int_equal(r.n, N_COLS);
        if (records == 0) {
            for (int c = 0; c < N_COLS; c++)
                assert_string_equal(r.field[c], keys[c]);
        } else if (strcmp(r.field[0], "ia3") == 0) {
            check_row((const char *const *)r.field, ia3_row);
            seen_ia3++;
        } else if (strcmp(r.field[0], "bitfit") == 0) {
            check_row((const char *const *)r.field, bitfit_row);
            seen_bitfit++;
        }
        records++;
        csv_free(&r);
    }
    assert_int_equal(rc, 0);   /* no malformed record, nothing after the last CRLF */
    assert_int_equal(seen_ia3, 1);
    assert_int_equal(seen_bitfit, 1);
    assert_true(records >= 1 + 5);   /* header + lora, ia3, bitfit, lnfit, full at least */
    free(out);
}

/* ---- JSON -------------------------------------------------------------------------- */

static void test_json(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run("typology --format json", &out), 0);
    json_error_t je;
    json_t *root = json_loads(out, 0, &je);
    if (!root)
        fprintf(stderr, "json: %s at line %d\n", je.text, je.line);
    assert_non_null(root);
    assert_true(json_is_array(root));
    assert_true(json_array_size(root) >= 5);
    const char *names[] = { "lora", "ia3", "bitfit", "lnfit", "full" };
    int found[5] = { 0 };
    size_t i;
    json_t *o;
    json_array_foreach(root, i, o) {
        assert_true(json_is_object(o));
        assert_int_equal(json_object_size(o), N_COLS);
        for (int c = 0; c < N_COLS; c++)
            assert_non_null(json_object_get(o, keys[c]));
        assert_true(json_is_array(json_object_get(o, "workspace")));
        assert_true(json_is_boolean(json_object_get(o, "mergeable")));
        const char *name = json_string_value(json_object_get(o, "technique"));
        assert_non_null(name);
        for (int k = 0; k < 5; k++)
            found[k] += strcmp(name, names[k]) == 0;
        const char *const *want = strcmp(name, "ia3") == 0 ? ia3_row : strcmp(name, "bitfit") == 0 ? bitfit_row : NULL;
        if (!want)
            continue;
        for (int c = 1; c < N_COLS; c++) {
            if (c == 9 || c == 10 || !want[c])
                continue;
            assert_string_equal(json_string_value(json_object_get(o, keys[c])), want[c]);
        }
        json_t *ws = json_object_get(o, "workspace");
        const char *ws_want = want[9];
        char joined[128] = "";
        size_t k;
        json_t *w;
        json_array_foreach(ws, k, w) {
            if (k)
                strcat(joined, ", ");
            strcat(joined, json_string_value(w));
        }
        assert_string_equal(joined, ws_want);
        assert_int_equal(json_is_true(json_object_get(o, "mergeable")), strcmp(want[10], "yes") == 0);
    }
    for (int k = 0; k < 5; k++)
        assert_int_equal(found[k], 1);
    json_decref(root);
    free(out);
}

/* ---- Markdown and text ---------------------------------------------------------------- */

/* Split a Markdown row into cells (unescaping \|); returns the count. */
static int md_cells(const char *line, char cells[][512], int max)
{
    if (line[0] != '|')
        return -1;
    int n = 0;
    size_t k = 0;
    for (const char *s = line + 1; *s; s++) {
        if (*s == '\\' && s[1] == '|') {
            cells[n][k++] = '|';
            s++;
        } else if (*s == '|') {
            cells[n][k] = '\0';
            /* trim the one space each side */
            char *c = cells[n];
            size_t len = strlen(c);
            if (len && c[len - 1] == ' ')
                c[--len] = '\0';
            if (c[0] == ' ')
                memmove(c, c + 1, len);
            if (++n == max)
                return n;
            k = 0;
        } else {
            cells[n][k++] = *s;
        }
    }
    return n;
}

static void test_markdown(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run("typology --format markdown", &out), 0);
    int line_no = 0, rows = 0;
    char *save = NULL;
    static char cells[N_COLS + 2][512];
    for (char *line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save), line_no++) {
        size_t len = strlen(line);
        assert_true(len > 2 && line[0] == '|' && line[len - 1] == '|');
        int n = md_cells(line, cells, N_COLS + 2);
        assert_int_equal(n, N_COLS);
        if (line_no == 1) {
            for (int c = 0; c < N_COLS; c++)
                assert_string_equal(cells[c], "---");
            continue;
        }
        if (line_no == 0) {
            assert_string_equal(cells[0], "technique");
            continue;
        }
        rows++;
        const char *row[N_COLS];
        for (int c = 0; c < N_COLS; c++)
            row[c] = cells[c];
        if (strcmp(cells[0], "ia3") == 0)
            check_row(row, ia3_row);
        else if (strcmp(cells[0], "bitfit") == 0)
            check_row(row, bitfit_row);
    }
    assert_true(rows >= 5);
    free(out);
}

static void test_text(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run("typology", &out), 0);
    char *save = NULL;
    char *header = strtok_r(out, "\n", &save);
    assert_non_null(header);
    assert_true(strncmp(header, "technique", 9) == 0);
    const char *titles[] = { "intra-connectivity", "insertions", "integration form", "workspace", "merge" };
    int col[5];
    for (int k = 0; k < 5; k++) {
        const char *at = strstr(header, titles[k]);
        assert_non_null(at);
        col[k] = (int)(at - header);
    }
    int seen = 0;
    for (char *line = strtok_r(NULL, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        const char *const *want = strncmp(line, "ia3 ", 4) == 0      ? ia3_row
                                  : strncmp(line, "bitfit ", 7) == 0 ? bitfit_row
                                                                     : NULL;
        if (!want)
            continue;
        seen++;
        const int idx[5] = { 1, 7, 8, 9, 10 };
        for (int k = 0; k < 5; k++) {
            assert_true((int)strlen(line) > col[k]);
            assert_true(strncmp(line + col[k], want[idx[k]], strlen(want[idx[k]])) == 0);
            assert_true(line[col[k] - 1] == ' ');
        }
    }
    assert_int_equal(seen, 2);
    free(out);
}

static void test_usage(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run("typology --format xml", &out), 2);
    free(out);
    assert_int_equal(run("typology extra", &out), 2);
    free(out);
    assert_int_equal(run("typology --help", &out), 0);
    assert_non_null(strstr(out, "--format"));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_csv),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_markdown),
        cmocka_unit_test(test_text),
        cmocka_unit_test(test_usage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
