BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE images (
    id SERIAL NOT NULL, 
    sha256 VARCHAR(64) NOT NULL, 
    root TEXT NOT NULL, 
    rel_path TEXT NOT NULL, 
    size_bytes BIGINT NOT NULL, 
    width INTEGER NOT NULL, 
    height INTEGER NOT NULL, 
    PRIMARY KEY (id), 
    UNIQUE (sha256)
);

CREATE TABLE model_versions (
    version INTEGER NOT NULL, 
    parent_version INTEGER, 
    iteration INTEGER, 
    path TEXT NOT NULL, 
    base_model TEXT NOT NULL, 
    clip_model TEXT NOT NULL, 
    clip_pretrained TEXT, 
    weights_hash VARCHAR(64), 
    lora_config JSON, 
    metrics JSON, 
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    PRIMARY KEY (version), 
    FOREIGN KEY(parent_version) REFERENCES model_versions (version)
);

CREATE TABLE iterations (
    number INTEGER NOT NULL, 
    policy_version INTEGER NOT NULL, 
    preset VARCHAR(32) NOT NULL, 
    config JSON NOT NULL, 
    config_hash VARCHAR(64) NOT NULL, 
    state VARCHAR(16) NOT NULL, 
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    PRIMARY KEY (number), 
    FOREIGN KEY(policy_version) REFERENCES model_versions (version)
);

CREATE TABLE prompts (
    id SERIAL NOT NULL, 
    external_id VARCHAR(255) NOT NULL, 
    image_id INTEGER NOT NULL, 
    text TEXT NOT NULL, 
    source TEXT NOT NULL, 
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(image_id) REFERENCES images (id), 
    UNIQUE (external_id)
);

CREATE INDEX ix_prompts_image_id ON prompts (image_id);

CREATE TABLE candidates (
    id BIGSERIAL NOT NULL, 
    iteration INTEGER NOT NULL, 
    prompt_id INTEGER NOT NULL, 
    node INTEGER NOT NULL, 
    parent_node INTEGER, 
    depth INTEGER NOT NULL, 
    sibling_index INTEGER NOT NULL, 
    text TEXT NOT NULL, 
    token_count INTEGER NOT NULL, 
    logprob_sum FLOAT NOT NULL, 
    r_t FLOAT NOT NULL, 
    r_i FLOAT NOT NULL, 
    reward FLOAT NOT NULL, 
    cumulative_reward FLOAT NOT NULL, 
    is_final BOOLEAN NOT NULL, 
    is_kept BOOLEAN NOT NULL, 
    exclusion_reason VARCHAR(64), 
    PRIMARY KEY (id), 
    FOREIGN KEY(iteration) REFERENCES iterations (number), 
    FOREIGN KEY(prompt_id) REFERENCES prompts (id), 
    CONSTRAINT uq_candidates_tree_node UNIQUE (iteration, prompt_id, node)
);

CREATE INDEX ix_candidates_final ON candidates (iteration, is_final);

CREATE TABLE pair_sets (
    id SERIAL NOT NULL, 
    iteration INTEGER NOT NULL, 
    name VARCHAR(128) NOT NULL, 
    preset VARCHAR(32) NOT NULL, 
    params JSON NOT NULL, 
    selection_sql TEXT NOT NULL, 
    result_hash VARCHAR(64) NOT NULL, 
    is_default BOOLEAN NOT NULL, 
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(iteration) REFERENCES iterations (number), 
    UNIQUE (iteration, name)
);

CREATE TABLE workers (
    id SERIAL NOT NULL, 
    iteration INTEGER NOT NULL, 
    host VARCHAR(255) NOT NULL, 
    pid INTEGER NOT NULL, 
    device VARCHAR(64) NOT NULL, 
    started_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    heartbeat_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    stopped_at TIMESTAMP WITHOUT TIME ZONE, 
    PRIMARY KEY (id), 
    FOREIGN KEY(iteration) REFERENCES iterations (number)
);

CREATE TABLE pairs (
    id BIGSERIAL NOT NULL, 
    pair_set_id INTEGER NOT NULL, 
    prompt_id INTEGER NOT NULL, 
    chosen_candidate_id BIGINT NOT NULL, 
    rejected_candidate_id BIGINT NOT NULL, 
    chosen_text TEXT NOT NULL, 
    rejected_text TEXT NOT NULL, 
    chosen_reward FLOAT NOT NULL, 
    rejected_reward FLOAT NOT NULL, 
    margin FLOAT NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(chosen_candidate_id) REFERENCES candidates (id), 
    FOREIGN KEY(pair_set_id) REFERENCES pair_sets (id) ON DELETE CASCADE, 
    FOREIGN KEY(prompt_id) REFERENCES prompts (id), 
    FOREIGN KEY(rejected_candidate_id) REFERENCES candidates (id), 
    UNIQUE (pair_set_id, prompt_id)
);

CREATE TABLE training_runs (
    id SERIAL NOT NULL, 
    iteration INTEGER NOT NULL, 
    pair_set_id INTEGER NOT NULL, 
    selection_sql TEXT NOT NULL, 
    pairs_hash VARCHAR(64) NOT NULL, 
    hyperparams JSON NOT NULL, 
    metrics JSON, 
    state VARCHAR(16) NOT NULL, 
    checkpoint_dir TEXT NOT NULL, 
    output_version INTEGER, 
    started_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    finished_at TIMESTAMP WITHOUT TIME ZONE, 
    PRIMARY KEY (id), 
    FOREIGN KEY(iteration) REFERENCES iterations (number), 
    FOREIGN KEY(output_version) REFERENCES model_versions (version), 
    FOREIGN KEY(pair_set_id) REFERENCES pair_sets (id)
);

CREATE TABLE work_items (
    id BIGSERIAL NOT NULL, 
    iteration INTEGER NOT NULL, 
    prompt_id INTEGER NOT NULL, 
    state VARCHAR(16) NOT NULL, 
    worker_id INTEGER, 
    lease_expires_at TIMESTAMP WITHOUT TIME ZONE, 
    attempts INTEGER NOT NULL, 
    last_error TEXT, 
    updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(iteration) REFERENCES iterations (number), 
    FOREIGN KEY(prompt_id) REFERENCES prompts (id), 
    FOREIGN KEY(worker_id) REFERENCES workers (id), 
    UNIQUE (iteration, prompt_id)
);

CREATE INDEX ix_work_items_claim ON work_items (iteration, state, lease_expires_at);

INSERT INTO alembic_version (version_num) VALUES ('0001') RETURNING alembic_version.version_num;

-- Running upgrade 0001 -> 0002

CREATE TABLE evaluations (
    id SERIAL NOT NULL, 
    model_version INTEGER NOT NULL, 
    benchmark VARCHAR(128) NOT NULL, 
    n_responses INTEGER NOT NULL, 
    chair_s FLOAT NOT NULL, 
    chair_i FLOAT NOT NULL, 
    mean_words FLOAT NOT NULL, 
    details JSON, 
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(model_version) REFERENCES model_versions (version), 
    UNIQUE (model_version, benchmark)
);

ALTER TABLE candidates ADD COLUMN finish_reason VARCHAR(16);

CREATE INDEX ix_candidates_children ON candidates (iteration, prompt_id, parent_node);

UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

CREATE TABLE responses (
    id BIGSERIAL NOT NULL, 
    iteration INTEGER NOT NULL, 
    prompt_id INTEGER NOT NULL, 
    leaf_node INTEGER NOT NULL, 
    leaf_candidate_id BIGINT NOT NULL, 
    text TEXT NOT NULL, 
    token_ids JSON, 
    has_token_ids BOOLEAN NOT NULL, 
    token_count INTEGER NOT NULL, 
    sentence_count INTEGER NOT NULL, 
    logprob_sum FLOAT NOT NULL, 
    r_t_sum FLOAT NOT NULL, 
    r_i_sum FLOAT NOT NULL, 
    text_rank_sum FLOAT NOT NULL, 
    image_rank_sum FLOAT NOT NULL, 
    is_truncated BOOLEAN NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(iteration) REFERENCES iterations (number), 
    FOREIGN KEY(leaf_candidate_id) REFERENCES candidates (id), 
    FOREIGN KEY(prompt_id) REFERENCES prompts (id), 
    CONSTRAINT uq_responses_leaf UNIQUE (iteration, prompt_id, leaf_node)
);

CREATE INDEX ix_responses_prompt ON responses (iteration, prompt_id);

CREATE UNIQUE INDEX ix_responses_leaf_candidate ON responses (leaf_candidate_id);

ALTER TABLE candidates ADD COLUMN token_ids JSON;

ALTER TABLE candidates ADD COLUMN beam_score FLOAT;

ALTER TABLE candidates ADD COLUMN text_rank FLOAT;

ALTER TABLE candidates ADD COLUMN image_rank FLOAT;

UPDATE alembic_version SET version_num='0003' WHERE alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

ALTER TABLE evaluations ADD COLUMN fingerprint VARCHAR(64);

ALTER TABLE evaluations ADD COLUMN dataset_hash VARCHAR(64);

ALTER TABLE evaluations ADD COLUMN settings JSON;

ALTER TABLE evaluations ADD COLUMN metrics JSON;

ALTER TABLE evaluations ADD COLUMN items JSON;

ALTER TABLE evaluations ALTER COLUMN fingerprint SET NOT NULL;

ALTER TABLE evaluations ALTER COLUMN chair_s DROP NOT NULL;

ALTER TABLE evaluations ALTER COLUMN chair_i DROP NOT NULL;

ALTER TABLE evaluations ALTER COLUMN mean_words DROP NOT NULL;

ALTER TABLE evaluations DROP CONSTRAINT evaluations_model_version_benchmark_key;

ALTER TABLE evaluations ADD CONSTRAINT uq_evaluations_version_fingerprint UNIQUE (model_version, fingerprint);

UPDATE alembic_version SET version_num='0004' WHERE alembic_version.version_num = '0003';

COMMIT;

