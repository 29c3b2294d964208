"""placeholder"""
def add_eval_parser(sub, add_model_args):
    pass
