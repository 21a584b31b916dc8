/*
 * chat.h - chat templates: messages -> prompt fragments.
 *
 * saserve does not run Jinja.  It recognises the common template families in
 * a model's tokenizer.chat_template and renders them natively; ChatML is the
 * fallback for models without a template (such as sa-tiny).  Template parts
 * are marked parse_special so "<|im_start|>" and friends become their
 * control tokens; message contents never do.
 */
#ifndef SASERVE_CHAT_H
#define SASERVE_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include "buf.h"
#include "engine.h"

typedef struct {
    const char *role;   /* "system", "user", "assistant" */
    const char *content;
    size_t len;
} chat_message;

/* Family names: chatml, llama2, llama3, mistral, zephyr, gemma, phi3. */
const char *chat_detect_family(const char *template_text);
bool chat_family_known(const char *name);
/* Comma-separated list of the known families, for messages. */
const char *chat_family_list(void);

/* Renders messages plus the assistant prefix into fragments.  Text lives in
 * *text (fragments point into it after the call; do not append afterwards).
 * Returns the fragment count, or -1 if more than max_frags were needed.
 * *add_bos tells whether the tokenizer should add BOS itself (false when the
 * template writes it). */
int chat_render(const char *family, const chat_message *msgs, int n, buf *text, engine_fragment *frags,
                int max_frags, bool *add_bos);

/* The string that ends an assistant turn in this family (a stop string when
 * the model has no such control token). */
const char *chat_end_marker(const char *family);

#endif
