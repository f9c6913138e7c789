#!/bin/sh
# A rank killed with SIGKILL mid-run: mpirun ends the job, rank 0 says at
# which step and where the last checkpoint is, that checkpoint loads, and
# `mpirun -np 2 peftref train --resume` ends with the losses of the same
# run left uninterrupted (a composition with dropout, 80 steps, a
# checkpoint every 5).  Skips (77) without MPI or mpirun.
. "$(dirname "$0")/mpi_lib.sh"
skip_without_mpi
make_pc_data "$tmp/pc.jsonl"
write_pipeline "$tmp/run.yaml" mix "$tmp/pc.jsonl"
sets="--set train.steps=80 --set train.checkpoint_every=5 --set train.eval_every=20"
$MPIRUN -np 2 "$PEFTREF" train "$tmp/run.yaml" --set "train.output=$tmp/straight" $sets --quiet \
    > "$tmp/straight.out" 2> "$tmp/straight.err"
check "uninterrupted 2-rank run" [ $? -eq 0 ]

last_step() { sed -n 's/^{"step": \([0-9]*\), "loss".*/\1/p' "$tmp/killed/metrics.jsonl" 2>/dev/null | tail -n1; }
# the pid of rank R of the job started by mpirun MPIRUN_PID
rank_pid() {
    for p in $(pgrep -P "$1"); do
        if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
            echo "$p"
            return
        fi
    done
}
$MPIRUN -np 2 "$PEFTREF" train "$tmp/run.yaml" --set "train.output=$tmp/killed" $sets --quiet \
    > "$tmp/killed.out" 2> "$tmp/killed.err" &
job=$!
i=0
while [ "$(last_step)" = "" ] || [ "$(last_step)" -lt 17 ]; do
    i=$((i + 1))
    [ $i -gt 600 ] && break
    sleep 0.05
done
victim=$(rank_pid $job 1)
survivor=$(rank_pid $job 0)
at=$(last_step)
[ -n "$victim" ] && kill -9 "$victim"
wait $job
status=$?
echo "     killed rank 1 (pid ${victim:-none}) after step $at; mpirun exited $status"
check "rank 1 was found and killed mid-run" [ -n "$victim" -a "${at:-80}" -lt 80 ]
check "the job ends with a non-zero status" [ $status -ne 0 ]
note=$(grep "^peftref train: rank 0 of 2: stopped by signal" "$tmp/killed.err")
echo "     $note"
check "rank 0 says the job stopped and where the intact checkpoint is" \
    sh -c "echo \"\$1\" | grep -q 'the last checkpoint, .*/killed/checkpoint.safetensors at step [0-9]*, is intact'" _ "$note"
ck=$(echo "$note" | sed -n 's/.*checkpoint.safetensors at step \([0-9]*\),.*/\1/p')
# rank 0 has ended too (gone, or a zombie where nothing reaps orphans)
gone() { [ ! -e "/proc/$1" ] || [ "$(sed 's/.*) \(.\).*/\1/' "/proc/$1/stat" 2>/dev/null)" = Z ]; }
check "rank 0 (pid ${survivor:-none}) has ended too" gone "${survivor:-0}"

$MPIRUN -np 2 "$PEFTREF" train "$tmp/run.yaml" --set "train.output=$tmp/killed" $sets --resume \
    --progress plain > "$tmp/resume.out" 2> "$tmp/resume.err"
check "--resume under mpirun -np 2" [ $? -eq 0 ]
check "it loads the checkpoint rank 0 named (step $ck)" grep -q "resumed from .*checkpoint.safetensors at step $ck\$" \
    "$tmp/resume.err"
final() { sed -n 's/^steps 80  train_loss [0-9.]* -> \([0-9.]*\)  val_loss [0-9.]* -> \([0-9.]*\).*/\1 \2/p' "$1"; }
echo "     final train_loss, val_loss: uninterrupted $(final "$tmp/straight.out"), resumed $(final "$tmp/resume.out")"
check "the resumed run ends with the uninterrupted run's final losses" \
    [ -n "$(final "$tmp/straight.out")" -a "$(final "$tmp/straight.out")" = "$(final "$tmp/resume.out")" ]
check "every step's loss as uninterrupted (80 steps within 1e-5)" \
    same_losses "$tmp/straight/metrics.jsonl" "$tmp/killed/metrics.jsonl" 80
check "no step twice in metrics.jsonl" \
    [ -z "$(losses "$tmp/killed/metrics.jsonl" | cut -d' ' -f1 | sort | uniq -d)" ]
finish
