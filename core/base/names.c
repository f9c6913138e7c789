/* peftref core: small helpers for names in messages and suggestions. */
#include "config.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "peftref/plugin.h"
#include "peftref/site.h"
#include "names.h"

void names_site_mask(uint32_t mask, const char *none, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        if (!(mask & PR_SITE_BIT(s)))
            continue;
        int w = snprintf(buf + o, len - o, "%s%s", o ? ", " : "", pr_site_name(s));
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
    }
    if (!buf[0])
        snprintf(buf, len, "%s", none);
}

static int fold_char(int c)
{
    if (c >= 'A' && c <= 'Z')
        c = c - 'A' + 'a';
    return c == '-' ? '_' : c;
}

int names_edit_distance(const char *a, const char *b)
{
    size_t n = strlen(a), m = strlen(b);
    if (n > 64 || m > 64)
        return INT_MAX;
    int d[65][65];
    for (size_t i = 0; i <= n; i++)
        d[i][0] = (int)i;
    for (size_t j = 0; j <= m; j++)
        d[0][j] = (int)j;
    for (size_t i = 1; i <= n; i++)
        for (size_t j = 1; j <= m; j++) {
            int ca = fold_char(a[i - 1]), cb = fold_char(b[j - 1]);
            int v = d[i - 1][j - 1] + (ca != cb);
            if (d[i - 1][j] + 1 < v)
                v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v)
                v = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && ca == fold_char(b[j - 2]) && fold_char(a[i - 2]) == cb &&
                d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    return d[n][m];
}
