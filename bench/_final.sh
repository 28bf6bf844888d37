set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s); el(){ echo "[$(( $(date +%s) - t0 )) s] $*"; }
el check; timeout 60 python -m bench.check_kernels > $OUT/check_kernels.txt 2>&1; echo rc=$?; grep -v "Warn\|warn" $OUT/check_kernels.txt | tail -16 | cut -c1-220
el rs32; timeout 130 python -m bench.real_scale --layers 61 --seq-len 32768 --out $OUT/rs > $OUT/rs32.txt 2>&1; echo rc=$?; grep "stage" $OUT/rs32.txt; tail -2 $OUT/rs32.txt | cut -c1-300
el rs128; timeout 160 python -m bench.real_scale --layers 61 --seq-len 131072 --stages sparse --out $OUT/rs > $OUT/rs128.txt 2>&1; echo rc=$?; grep stage $OUT/rs128.txt; tail -2 $OUT/rs128.txt | cut -c1-300
el topk; timeout 90 python -m bench.bench_topk --out $OUT/topk --seq-lens 8192 32768 131072 --baseline-max 32768 --budget-s 70 > $OUT/topk.txt 2>&1; echo rc=$?; grep -v "Warn\|warn" $OUT/topk.txt | tail -14 | cut -c1-250
el fam; timeout 110 python -m bench.families --out $OUT/families.json > $OUT/fam.txt 2>&1; echo rc=$?; grep " {'stage\|failed\|Error" $OUT/fam.txt | cut -c1-260
el done
